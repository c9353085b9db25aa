"""The `ih-jax` command's launchers (train, sweep, analyze, reproduce, bench), its shipped
configs, and the reproduction of the paper's figures."""

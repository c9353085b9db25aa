"""`import ih_jax` sets its XLA:CPU defaults only while JAX's backend has not started,
and warns (rather than silently doing nothing) when it already has."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, **env) -> subprocess.CompletedProcess:
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "IH_JAX_KEEP_XLA_FLAGS")}
  return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT, text=True,
                        capture_output=True, timeout=120, env=dict(clean, **env))


def test_flags_applied_before_the_backend_starts():
  # jax imported but no backend yet: still safe.
  out = _python("import jax\nimport ih_jax, os\nprint(os.environ['XLA_FLAGS'])\n"
                "print(len(jax.devices()))")
  assert out.returncode == 0, out.stderr
  assert "--xla_cpu_experimental_ynn_fusion_type=dot" in out.stdout
  from ih_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  assert int(out.stdout.split()[-1]) == cpu_flags.usable_cores()
  assert "RuntimeWarning" not in out.stderr, out.stderr


def test_warns_when_jax_already_started():
  out = _python("import jax\njax.numpy.zeros(1)\nimport ih_jax, os\n"
                "print(os.environ.get('XLA_FLAGS', ''))")
  assert out.returncode == 0, out.stderr
  assert "RuntimeWarning" in out.stderr and "restart the runtime" in out.stderr
  assert "xla_force_host_platform_device_count" not in out.stdout  # nothing pretended


def test_user_flags_are_kept():
  out = _python("import ih_jax, os\nprint(os.environ['XLA_FLAGS'])",
                XLA_FLAGS="--xla_force_host_platform_device_count=3")
  assert out.returncode == 0, out.stderr
  assert "--xla_force_host_platform_device_count=3" in out.stdout
  assert out.stdout.count("xla_force_host_platform_device_count") == 1
  kept = _python("import ih_jax, os\nprint(repr(os.environ.get('XLA_FLAGS', '')))",
                 IH_JAX_KEEP_XLA_FLAGS="1")
  assert kept.stdout.strip() == "''"

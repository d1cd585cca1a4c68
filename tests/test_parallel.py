"""N devices and N processes give the same update as one device on the same global batch."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


def _env(xla_flags=""):
  """The test session's environment (its XLA flags, see conftest) plus ``xla_flags``."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), xla_flags) if f)
  return env


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["devices", "modalimmune", "consistency", "cmpt",
                                  "ebr+distill"])
def test_four_devices_match_one(tmp_path, mode):
  """Plain, ModalImmune (controller, interventions, collapse penalty,
  curvature mask and BHGD all active), consistency regularisation (zero /
  noise / swap copies drawn for the global batch, PGD), CMPT (plain steps,
  then the freeze, sample-eta drops drawn for the global batch, alignment),
  EBR (the nets' update, the similarity sums, the cross term's source draws
  and modality dropout) and distillation (teacher
  steps, then the feature MSE on a student batch with modality dropout, whose
  per-device cell counts differ) give the same SGD update on 4 devices."""
  out = str(tmp_path / "dev.npz")
  proc = subprocess.run([sys.executable, WORKER, mode, out], capture_output=True,
                        text=True, timeout=300,
                        env=_env("--xla_force_host_platform_device_count=4"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = np.load(out)
  assert int(res["devices"]) == 4
  for many in [k for k in res.files if k.startswith("many")]:  # one pair per method
    one = "one" + many[len("many"):]
    assert not np.allclose(res[one], 0.0)  # trained something
    np.testing.assert_allclose(res[many], res[one], rtol=2e-5, atol=2e-6, err_msg=many)
  if mode == "modalimmune":  # the periodic parts ran: 4 controller updates, 2 hyper-steps
    assert int(res["ctrl_count"]) == 4
    assert int(res["hyper_applied"]) + int(res["hyper_rejected"]) == 2


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  from tests.dp_worker import run_steps, worker_config
  out = str(tmp_path / "proc.npz")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, WORKER, "process", out, port, "2", str(pid)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
           for pid in range(2)]
  errors = []
  for p in procs:
    try:
      _, err = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      p.kill()
      _, err = p.communicate()
    if p.returncode != 0:
      errors.append(err[-3000:])
  assert not errors, "\n---\n".join(errors)
  res = np.load(out)
  assert int(res["devices"]) == 2 and int(res["processes"]) == 2
  one, _, _ = run_steps(worker_config(), num_devices=1)
  np.testing.assert_allclose(res["params"], one, rtol=2e-5, atol=2e-6)

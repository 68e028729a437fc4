"""The numba.cuda path, checked everywhere with Numba's CUDA simulator (a subprocess, since the
simulator must be chosen before numba.cuda is imported)."""
import os
import subprocess
import sys

from server_util import REPO, TINYLLAMA2, Server


def test_cuda_kernels_equal_cpu_twins_in_simulator(stories_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cuda_sim_check.py"), stories_path],
                       cwd=REPO, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    # all 13 types in vec_dot order, Q4_0 and Q4_K repacked, 5 K-quants tiled, rms_norm, and
    # attention with and without a sliding window
    assert r.stdout.count("bit-identical True") == 13 + 2 + 5 + 1 + 2
    assert "max |diff| 0.00e+00, same argmax True" in r.stdout


def test_gpu_request_without_gpu_falls_back_to_cpu(stories_path):
    """This machine has no GPU: the server says so and serves from the CPU."""
    from numllama.engine.cuda_backend import cuda_status
    ok, why = cuda_status()
    s = Server(TINYLLAMA2 + ["--n-gpu-layers", "99"], model=stories_path)
    try:
        r = s.post("/completion", {"prompt": "Once", "n_predict": 4})
        assert r.status_code == 200
        device = s.get("/props").json()["device"]
        assert device == ("cpu" if not ok else device)
    finally:
        s.stop()

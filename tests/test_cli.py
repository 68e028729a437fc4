import subprocess
import sys


def test_generate_streams_llama_cpp_greedy_text(stories_path, stories_golden):
    g = stories_golden["greedy"][1]
    r = subprocess.run([sys.executable, "-m", "numllama.engine.cli", "generate", "-m", stories_path,
                        "-p", g["prompt"], "-n", str(g["n_predict"]), "--temp", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == g["content"]


def test_generate_bad_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "numllama.engine.cli", "generate", "-m", str(bad), "-p", "x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not a GGUF file" in r.stderr

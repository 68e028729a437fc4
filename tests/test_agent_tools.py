"""The built-in agent tools (--tools), called directly: paths, globs, edits, the shell."""
import os
import subprocess

import pytest

from numllama.webapp.agent_tools import TOOLS, ToolError, glob_match, select_tools

T = {t.name: t for t in TOOLS}


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "src" / "deep").mkdir(parents=True)
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "a.py").write_text("import os\nprint('hi')\n")
    (tmp_path / "src" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "src" / "deep" / "c.txt").write_text("alpha\nbeta\ngamma\n")
    (tmp_path / "node_modules" / "junk.py").write_text("junk\n")
    return tmp_path


@pytest.mark.parametrize("pattern, path, hit", [
    ("*.py", "a.py", True), ("*.py", "src/deep/x.py", True), ("*.py", "a.pyc", False),
    ("src/*.py", "src/b.py", True), ("src/*.py", "x/src/b.py", True), ("src/*.py", "src/d/b.py", False),
    ("src/**/*.py", "src/d/e/b.py", True), ("/src/*.py", "x/src/b.py", False), ("**", "any/thing", True),
    ("[ab].py", "b.py", True), ("[ab].py", "c.py", False), ("?.py", "ab.py", False),
])
def test_glob_semantics(pattern, path, hit):
    assert glob_match(pattern, path) is hit


def test_select_tools():
    assert [t.name for t in select_tools("all")] == [t.name for t in TOOLS]
    assert [t.name for t in select_tools("get_info,read_file")] == ["read_file", "get_info"]
    assert select_tools("") == []
    with pytest.raises(ValueError, match='unknown tool "rm_rf".*read_file'):
        select_tools("rm_rf")


def test_read_file_ranges_and_limits(tree):
    cwd = {"cwd": str(tree)}
    assert T["read_file"].invoke({"path": "src/deep/c.txt", **cwd}) == {"plain_text_response": "alpha\nbeta\ngamma\n"}
    out = T["read_file"].invoke({"path": "src/deep/c.txt", "start_line": 2, "end_line": 2, "append_loc": True, **cwd})
    assert out == {"plain_text_response": "2\u2192beta\n"}
    assert T["read_file"].invoke({"path": "nope", **cwd}) == {"error": "cannot stat file: nope"}
    (tree / "big.txt").write_text(("y" * 99 + "\n") * 200)   # 20 KB
    assert "file too large" in T["read_file"].invoke({"path": "big.txt", **cwd})["error"]
    part = T["read_file"].invoke({"path": "big.txt", "start_line": 1, "end_line": 1000, **cwd})
    assert part["plain_text_response"].endswith("[output truncated]")
    with pytest.raises(ToolError):
        T["read_file"].invoke({"cwd": str(tree)})            # no path


def test_glob_search_skips_junk_and_lists_dirs(tree):
    out = T["file_glob_search"].invoke({"path": str(tree), "include": "*.py"})
    assert [e["path"] for e in out["entries"]] == ["a.py", "src/b.py"]
    assert out["base"] == str(tree) and "Total matches: 2" in out["plain_text_response"]
    dirs = T["file_glob_search"].invoke({"path": str(tree), "type": "dir"})
    # a junk folder is listed (it may be a working folder) but never walked into
    assert "src/deep/\n" in dirs["plain_text_response"] and "node_modules/\n" in dirs["plain_text_response"]
    everything = [e["path"] for e in T["file_glob_search"].invoke({"path": str(tree), "type": "all"})["entries"]]
    assert "node_modules" in everything and "node_modules/junk.py" not in everything
    one = T["file_glob_search"].invoke({"path": str(tree), "limit": 1})
    assert "results limit reached" in one["plain_text_response"]
    assert "invalid type" in T["file_glob_search"].invoke({"path": str(tree), "type": "x"})["error"]


def test_glob_search_follows_gitignore(tree):
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    (tree / ".gitignore").write_text("a.py\n")
    out = T["file_glob_search"].invoke({"path": str(tree), "include": "*.py"})
    assert [e["path"] for e in out["entries"]] == ["node_modules/junk.py", "src/b.py"]


def test_grep_search(tree):
    out = T["grep_search"].invoke({"path": str(tree), "pattern": "^(alpha|return)", "include": "**"})["plain_text_response"]
    assert "src/deep/c.txt:alpha\n" in out and "Total matches: 1" in out   # "    return" is indented
    out = T["grep_search"].invoke({"path": str(tree), "pattern": "BETA", "ignore_case": True, "context_lines": 1})
    assert out["plain_text_response"].startswith("src/deep/c.txt-1-alpha\nsrc/deep/c.txt:2:beta\nsrc/deep/c.txt-3-gamma\n--\n")
    lit = T["grep_search"].invoke({"path": str(tree / "a.py"), "pattern": "print('hi')", "literal": True})
    assert "Total matches: 1" in lit["plain_text_response"]
    assert "invalid regex" in T["grep_search"].invoke({"path": str(tree), "pattern": "("})["error"]


def test_write_then_edit(tree):
    cwd = {"cwd": str(tree)}
    w = T["write_file"].invoke({"path": "new/dir/f.txt", "content": "one\ntwo  \nthree\n", **cwd})
    assert w == {"result": "file written successfully", "path": "new/dir/f.txt", "bytes": 16}
    e = T["edit_file"].invoke({"path": "new/dir/f.txt", "edits": [{"old_text": "one", "new_text": "1"},
                                                                   {"old_text": "three", "new_text": "3"}], **cwd})
    assert e["edits_applied"] == 2
    assert (tree / "new/dir/f.txt").read_text() == "1\ntwo  \n3\n"
    # the model dropped the trailing blanks and wrote a smart quote: matched fuzzily,
    # and the line it did not touch keeps its bytes
    (tree / "q.txt").write_text("keep  \nsay \"hi\"  \nend\n")
    e = T["edit_file"].invoke({"path": "q.txt", "edits": [{"old_text": "say \u201chi\u201d", "new_text": "say bye"}], **cwd})
    assert e["edits_applied"] == 1 and (tree / "q.txt").read_text() == "keep  \nsay bye\nend\n"
    dup = T["edit_file"].invoke({"path": "q.txt", "edits": [{"old_text": "e", "new_text": "E"}], **cwd})
    assert "must be unique" in dup["error"]
    miss = T["edit_file"].invoke({"path": "q.txt", "edits": [{"old_text": "zzz", "new_text": "E"}], **cwd})
    assert "could not find edits[0]" in miss["error"]
    same = T["edit_file"].invoke({"path": "q.txt", "edits": [{"old_text": "end", "new_text": "end"}], **cwd})
    assert "no changes made" in same["error"]


def test_shell_command(tree):
    out = T["exec_shell_command"].invoke({"command": "pwd; echo err >&2; exit 3", "cwd": str(tree)})
    assert out["plain_text_response"] == f"{os.path.realpath(tree)}\nerr\n\n[exit code: 3]"
    slow = T["exec_shell_command"].invoke({"command": "echo start; sleep 30", "timeout": 1})
    assert slow["plain_text_response"].startswith("start\n") and "[exit due to timed out]" in slow["plain_text_response"]
    big = T["exec_shell_command"].invoke({"command": "head -c 100000 /dev/zero | tr '\\0' x", "max_output_size": 10})
    assert big["plain_text_response"].startswith("x" * 10 + "\n[exit code: 0]")
    chunks = []
    assert T["exec_shell_command"].invoke({"command": "echo a; sleep 0.2; echo b"}, lambda c: chunks.append(c) or True) == {}
    assert "".join(chunks) == "a\nb\n\n[exit code: 0]" and len(chunks) >= 2


def test_get_info(tree):
    info = T["get_info"].invoke({"cwd": str(tree)})
    assert info["cwd"] == str(tree) and info["os"].startswith(os.uname().sysname)


@pytest.mark.parametrize("spec, said", [
    ("fake:x", "unknown tool runtime: fake:x"),
    ("ssh:-oProxyCommand=touch /tmp/pwned", "invalid ssh target: -oProxyCommand=touch /tmp/pwned"),
    ("docker-container:--privileged", "invalid container id: --privileged"),
    ("podman-container:a b", "invalid container id: a b"),
    ("docker:ubuntu", "tool runtime must name a running container: docker:ubuntu"),
    ("ssh:me@host", "is not supported by numllama"),
    ("docker-container:abc123", "is not supported by numllama"),
])
def test_tool_runtimes_are_refused(spec, said):
    """numllama runs tools here only: an isolate asked for is refused, never replaced by the host."""
    from numllama.webapp.agent_tools import runtime_refusal
    assert said in runtime_refusal(spec)

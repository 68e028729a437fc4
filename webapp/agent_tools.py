"""llama-server's built-in agent tools (`--tools`): what a model driven from the web UI may call
to look at and change the machine the server runs on.

Each tool has an OpenAI function definition (what the model sees), a display name and a
"write" permission flag (what the UI asks the user about), and `invoke(params)`, which returns
either {"plain_text_response": text} (placed verbatim in the tool message) or a JSON object
(stringified by the client), as llama.cpp's tools/server/server-tools.cpp does. Tool failures
the model should read ("cannot stat file") are {"error": ...} results, not HTTP errors.

These run with the server's own privileges: llama-server documents them as "do not enable in
untrusted environments", and turning them on narrows the CORS default to localhost.
Nothing here knows HTTP; webapp/tools.py serves them.
"""
from __future__ import annotations

import fnmatch
import logging
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("numllama.tools")

READ_MAX = 16 * 1024           # bytes of text read_file returns without a line range
SEARCH_MAX_RESULTS = 100       # file_glob_search and grep_search results
LIST_TIME_BUDGET = 15.0        # seconds one directory listing may take
SHELL_MAX_OUTPUT = 16 * 1024   # bytes of shell output kept
SHELL_MAX_TIMEOUT = 60         # seconds
# listed but never walked into when walking a tree that is not a git checkout (a git checkout
# uses .gitignore): they can be enormous; llama-server's list
JUNK_DIRS = {".git", ".svn", ".hg", "node_modules", "__pycache__", ".venv", "venv", "dist", "build", "target",
             ".cache", ".idea", ".vscode"}


class ToolError(ValueError):
    """A request the tool cannot take at all (unknown tool, bad parameters): HTTP 4xx."""


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, **({"required": required} if required else {})}}}


def _p(kind: str, description: str) -> dict:
    return {"type": kind, "description": description}


# ---- paths, listings and globs -----------------------------------------------------------------

def resolve(path: str, params: dict) -> str:
    """A tool path: "~" expanded, relative paths taken from the x-tool-cwd header's folder (else
    the server's working directory)."""
    path = os.path.expanduser(path)
    return os.path.abspath(os.path.join(params.get("cwd") or os.getcwd(), path))


def glob_regex(pattern: str) -> re.Pattern:
    """A path glob as llama.cpp matches it: `*` and `?` stay inside one path segment, `**` spans
    segments. A pattern without "/" matches the base name at any depth; one with "/" matches the
    whole relative path, anchored with "**/" unless it starts with "**/" or "/"."""
    if "/" not in pattern:
        pattern = "**/" + pattern
    elif pattern.startswith("/"):
        pattern = pattern[1:]
    elif not pattern.startswith("**/"):
        pattern = "**/" + pattern
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out.append(re.escape("["))
                i += 1
            else:
                out.append(fnmatch.translate(pattern[i:j + 1])[4:-3])  # fnmatch's class syntax
                i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def glob_match(pattern: str, rel: str) -> bool:
    return glob_regex(pattern).match(rel) is not None


@dataclass
class Listing:
    entries: list = field(default_factory=list)   # (relative path with "/", is_dir)
    truncated: bool = False
    error: str = ""


def list_entries(base: str, max_depth: int, kind: str) -> Listing:
    """Files and/or folders under `base` (kind "file", "dir" or "all"), relative, sorted.
    Inside a git checkout the files are git's (so .gitignore applies); elsewhere a walk that
    lists JUNK_DIRS without walking into them. max_depth 0 means unlimited."""
    if not os.path.exists(base):
        return Listing(error="path does not exist")
    if not os.path.isdir(base):
        return Listing(error="not a directory")
    out = Listing()
    if kind == "file":
        try:
            git = subprocess.run(["git", "-C", base, "ls-files", "-z", "--cached", "--others",
                                  "--exclude-standard"], capture_output=True, timeout=LIST_TIME_BUDGET)
            if git.returncode == 0:
                for rel in sorted(set(git.stdout.decode("utf-8", "replace").split("\0"))):
                    if rel and (max_depth == 0 or rel.count("/") < max_depth) \
                            and os.path.isfile(os.path.join(base, rel)):
                        out.entries.append((rel, False))
                return out
        except (OSError, subprocess.TimeoutExpired):
            pass
    deadline = time.monotonic() + LIST_TIME_BUDGET
    for root, dirs, files in os.walk(base, onerror=lambda e: setattr(out, "truncated", True)):
        dirs.sort()
        rel_root = os.path.relpath(root, base)
        depth = 0 if rel_root == "." else rel_root.count(os.sep) + 1
        prefix = "" if rel_root == "." else rel_root.replace(os.sep, "/") + "/"
        if kind in ("dir", "all"):
            out.entries += [(prefix + d, True) for d in dirs]
        dirs[:] = [d for d in dirs if d not in JUNK_DIRS]
        if kind in ("file", "all"):
            out.entries += [(prefix + f, False) for f in sorted(files)]
        if max_depth and depth + 1 >= max_depth:
            dirs[:] = []
        if time.monotonic() > deadline:
            out.truncated = True
            break
    out.entries.sort()
    return out


# ---- the tools ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    display_name: str
    definition: dict
    run: Callable            # run(params, emit) -> dict; emit(chunk) streams, None when not streaming
    write: bool = False      # the "write" permission: the UI asks before calling it
    streams: bool = False    # accepts "stream": true
    kind: str = "server"     # "server": built in; "mcp": an MCP server's (webapp/mcp_servers.py)
    uses_cwd: bool = True    # reads the working folder (X-Tool-Cwd)

    def to_json(self) -> dict:
        return {"display_name": self.display_name, "tool": self.name, "type": self.kind,
                "permissions": {"write": self.write}, "uses_cwd": self.uses_cwd, "definition": self.definition}

    def invoke(self, params: dict, emit: Callable[[str], bool] | None = None) -> dict:
        try:
            return self.run(params, emit)
        except KeyError as e:
            raise ToolError(f"missing parameter {e.args[0]!r} for tool \"{self.name}\"") from None
        except (TypeError, AttributeError) as e:
            raise ToolError(f"bad parameters for tool \"{self.name}\": {e}") from None


def _int(params: dict, key: str, default: int) -> int:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ToolError(f"parameter {key!r} must be an integer")
    return value


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def read_file(params, emit):
    path = params["path"]
    start, end = _int(params, "start_line", 1), _int(params, "end_line", -1)
    full = resolve(path, params)
    try:
        size = os.path.getsize(full)
    except OSError:
        return {"error": "cannot stat file: " + path}
    if size > READ_MAX and end == -1:
        return {"error": f"file too large ({size} bytes, max {READ_MAX}). "
                         "Use start_line/end_line to read a portion."}
    try:
        text = _read_text(full)
    except OSError:
        return {"error": "failed to open file: " + path}
    result = []
    used = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if lineno < start:
            continue
        if end != -1 and lineno > end:
            break
        out = (f"{lineno}\u2192{line}\n" if params.get("append_loc") else line + "\n")
        if used + len(out.encode()) > READ_MAX:
            result.append("[output truncated]")
            break
        result.append(out)
        used += len(out.encode())
    return {"plain_text_response": "".join(result)}


def file_glob_search(params, emit):
    path = params["path"]
    base = resolve(path, params)
    include, exclude = params.get("include", "**"), params.get("exclude", "")
    kind = params.get("type", "file")
    limit = _int(params, "limit", SEARCH_MAX_RESULTS)
    if limit < 1:
        return {"error": f"invalid limit: {limit} (expected 1 or more)"}
    if kind not in ("file", "dir", "all"):
        return {"error": f'invalid type: {kind} (expected "file", "dir" or "all")'}
    listing = list_entries(base, max(0, _int(params, "max_depth", 0)), kind)
    if listing.error:
        return {"error": f"{listing.error}: {path}"}
    inc, exc = glob_regex(include), glob_regex(exclude) if exclude else None
    matches = [(rel, d) for rel, d in listing.entries
               if inc.match(rel) and not (exc and exc.match(rel))]
    shown = matches[:min(limit, SEARCH_MAX_RESULTS)]
    text = "".join(rel + ("/" if d else "") + "\n" for rel, d in shown)
    text += f"\n---\nTotal matches: {len(matches)}\n"
    if len(matches) > len(shown):
        text += (f"[{len(shown)} results limit reached ({len(matches)} total matches). "
                 "Refine the glob pattern to narrow the search.]\n")
    if listing.truncated:
        text += "[results truncated: time budget or unreadable directory]\n"
    return {"plain_text_response": text, "base": base,
            "entries": [{"path": rel, "type": "dir" if d else "file"} for rel, d in shown]}


def grep_search(params, emit):
    path, pattern = params["path"], params["pattern"]
    include, exclude = params.get("include", "**"), params.get("exclude", "")
    context = max(0, _int(params, "context_lines", 0))
    try:
        regex = re.compile(re.escape(pattern) if params.get("literal") else pattern,
                           re.IGNORECASE if params.get("ignore_case") else 0)
    except re.error as e:
        return {"error": f"invalid regex: {e}"}
    full = resolve(path, params)
    if os.path.isfile(full):
        files = [(full, path)]
    elif os.path.isdir(full):
        listing = list_entries(full, 0, "file")
        if listing.error:
            return {"error": f"{listing.error}: {path}"}
        inc, exc = glob_regex(include), glob_regex(exclude) if exclude else None
        files = [(os.path.join(full, rel), rel) for rel, _ in listing.entries
                 if inc.match(rel) and not (exc and exc.match(rel))]
    else:
        return {"error": "path does not exist: " + path}
    numbers = bool(params.get("return_line_numbers")) or context > 0
    out, total, limited = [], 0, False
    for fpath, shown_as in files:
        try:
            lines = _read_text(fpath).splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines):
            if total >= SEARCH_MAX_RESULTS:
                limited = True
                break
            if not regex.search(line):
                continue
            for j in range(max(0, i - context), min(len(lines) - 1, i + context) + 1):
                sep = ":" if j == i else "-"
                out.append(f"{shown_as}{sep}" + (f"{j + 1}{sep}" if numbers else "") + lines[j] + "\n")
            if context:
                out.append("--\n")
            total += 1
        if limited:
            break
    text = "".join(out) + f"\n---\nTotal matches: {total}\n"
    if limited:
        text += f"[{SEARCH_MAX_RESULTS} matches limit reached. Narrow the path/pattern/include to see more.]\n"
    return {"plain_text_response": text}


def exec_shell_command(params, emit):
    """`sh -c command` with stdout and stderr merged, at most SHELL_MAX_OUTPUT bytes kept and
    SHELL_MAX_TIMEOUT seconds. With `emit`, output is streamed as it comes; emit returning False
    (the client went away) kills the command."""
    command = params["command"]
    if not isinstance(command, str):
        raise ToolError("parameter 'command' must be a string")
    timeout = min(_int(params, "timeout", 10), SHELL_MAX_TIMEOUT)
    max_output = min(_int(params, "max_output_size", SHELL_MAX_OUTPUT), SHELL_MAX_OUTPUT)
    try:
        proc = subprocess.Popen(["sh", "-c", command], cwd=params.get("cwd") or None, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:   # e.g. an x-tool-cwd folder that does not exist: the model can read why
        return {"error": f"cannot run the command: {e}"}
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.monotonic() + timeout
    kept, timed_out, gone = bytearray(), False, False
    while True:
        chunk = proc.stdout.read(4096)
        if chunk:
            room = max_output - len(kept)
            kept += chunk[:room]
            if emit and room > 0 and not emit(chunk[:room].decode("utf-8", "replace")):
                gone = True
        elif chunk == b"" and proc.poll() is not None:
            break
        else:
            time.sleep(0.01)
        if gone or time.monotonic() > deadline:
            timed_out = not gone
            os.killpg(proc.pid, 9)
            proc.wait()
            break
    proc.stdout.close()
    tail = f"\n[exit code: {proc.returncode}]" + (" [exit due to timed out]" if timed_out else "")
    if emit:
        if not gone:
            emit(tail)
        return {}
    return {"plain_text_response": kept.decode("utf-8", "replace") + tail}


def write_file(params, emit):
    path, content = params["path"], params["content"]
    if not isinstance(content, str):
        raise ToolError("parameter 'content' must be a string")
    full = resolve(path, params)
    try:
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8", newline="") as f:
            f.write(content)
    except OSError:
        return {"error": "failed to write file: " + path}
    return {"result": "file written successfully", "path": path, "bytes": len(content.encode())}


_FUZZY = str.maketrans({**{c: "'" for c in "\u2018\u2019\u201a\u201b"}, **{c: '"' for c in "\u201c\u201d\u201e\u201f"},
                        **{chr(c): "-" for c in range(0x2010, 0x2016)}, "\u2212": "-", "\u00a0": " ",
                        **{chr(c): " " for c in range(0x2002, 0x200b)}})


def _fuzzy(text: str) -> str:
    """What edit_file compares when the exact text is absent: trailing blanks dropped and smart
    quotes, dashes and odd spaces made ASCII, line by line (so line numbers are kept)."""
    return "\n".join(line.rstrip(" \t\r").translate(_FUZZY) for line in text.split("\n"))


def edit_file(params, emit):
    path, edits = params["path"], params["edits"]
    if not isinstance(edits, list) or not edits:
        return {"error": '"edits" must be a non-empty array'}
    for i, e in enumerate(edits):
        if not isinstance(e.get("old_text"), str) or not isinstance(e.get("new_text"), str):
            raise ToolError(f"edits[{i}] needs string old_text and new_text")
        if not e["old_text"]:
            return {"error": f"edits[{i}].old_text must not be empty"}
    full = resolve(path, params)
    try:
        with open(full, encoding="utf-8", newline="") as f:
            original = f.read()
    except (OSError, UnicodeDecodeError):
        return {"error": "failed to open file: " + path}
    fuzzy = any(e["old_text"] not in original for e in edits)
    base = _fuzzy(original) if fuzzy else original
    spans = []
    for i, e in enumerate(edits):
        needle = _fuzzy(e["old_text"]) if fuzzy else e["old_text"]
        if needle not in base:
            return {"error": f"could not find edits[{i}].old_text in {path}, "
                             "it must match the file's current content exactly"}
        count = _fuzzy(original).count(_fuzzy(e["old_text"]))
        if count > 1:
            return {"error": f"found {count} occurrences of edits[{i}].old_text in {path}, it must be unique"}
        at = base.index(needle)
        spans.append((at, at + len(needle), i, e["new_text"]))
    spans.sort()
    for (s0, e0, i0, _), (s1, _, i1, _) in zip(spans, spans[1:]):
        if e0 > s1:
            return {"error": f"edits[{i0}] and edits[{i1}] overlap in {path}; "
                             "merge them into one edit or target disjoint regions"}
    new = base
    for start, end, _, text in reversed(spans):
        new = new[:start] + text + new[end:]
    if fuzzy:  # lines the edits did not touch keep their original bytes
        new = _restore_untouched_lines(original, base, spans, new)
    if new == original:
        return {"error": "no changes made: the replacement(s) produced identical content"}
    try:
        with open(full, "w", encoding="utf-8", newline="") as f:
            f.write(new)
    except OSError:
        return {"error": "failed to write file: " + path}
    return {"result": "file edited successfully", "path": path, "edits_applied": len(spans)}


def _restore_untouched_lines(original: str, base: str, spans, new: str) -> str:
    """After a fuzzy edit of the normalized text `base`, put back the original form of every
    line outside the edited ranges."""
    orig_lines = original.split("\n")
    out, prev_line, shift = [], 0, 0
    for start, end, _, text in spans:
        first, last = base.count("\n", 0, start), base.count("\n", 0, end)
        if first < prev_line:  # two edits on one line: keep the normalized text as it is
            return new
        out += orig_lines[prev_line:first]
        # the edited lines, as they read in `new` (offsets moved by the earlier edits)
        line_start = base.rfind("\n", 0, start) + 1
        line_end = base.find("\n", end)
        line_end = len(base) if line_end < 0 else line_end
        out.append(new[line_start + shift:line_end + shift + len(text) - (end - start)])
        shift += len(text) - (end - start)
        prev_line = last + 1
    out += orig_lines[prev_line:]
    return "\n".join(out)


def get_info(params, emit):
    return {"os": " ".join(platform.uname()[:4]), "cwd": params.get("cwd") or os.getcwd()}


TOOLS = [
    Tool("read_file", "Read file", _fn(
        "read_file", "Read the contents of a file. Optionally specify a 1-based line range. If append_loc "
        "is true, each line is prefixed with its line number (e.g. \"1\u2192...\").",
        {"path": _p("string", "Path to the file"),
         "start_line": _p("integer", "First line to read, 1-based (default: 1)"),
         "end_line": _p("integer", "Last line to read, 1-based inclusive (default: end of file)"),
         "append_loc": _p("boolean", "Prefix each line with its line number")}, ["path"]), read_file),
    Tool("file_glob_search", "File search", _fn(
        "file_glob_search", "Recursively search for files matching a glob pattern under a directory. "
        "Skips files ignored by .gitignore inside a git repo, and common junk directories otherwise. "
        "A pattern with no '/' (e.g. \"*.py\") matches the file's basename at any depth; a pattern "
        "containing '/' matches the full relative path. Use type=\"dir\" or \"all\" to list directories "
        "too (suffixed with '/').",
        {"path": _p("string", "Base directory to search in"),
         "include": _p("string", "Glob pattern for files to include (e.g. \"*.py\" or \"src/**/*.py\"). Default: **"),
         "exclude": _p("string", "Glob pattern for files to exclude"),
         "type": _p("string", "Entry type to return: \"file\" (default), \"dir\" or \"all\""),
         "max_depth": _p("integer", "Maximum depth to descend into subdirectories (default: 0 = unlimited)"),
         "limit": _p("integer", f"Maximum number of results to return, capped at {SEARCH_MAX_RESULTS}")},
        ["path"]), file_glob_search),
    Tool("grep_search", "Grep search", _fn(
        "grep_search", "Search for a pattern in files under a path. Returns matching lines with file paths "
        "(relative to the given directory). include/exclude are globs as in file_glob_search.",
        {"path": _p("string", "File or directory to search in"),
         "pattern": _p("string", "Pattern to search for (regular expression unless literal is true)"),
         "include": _p("string", "Glob pattern to filter files (default: **)"),
         "exclude": _p("string", "Glob pattern to exclude files"),
         "return_line_numbers": _p("boolean", "If true, include line numbers in results"),
         "literal": _p("boolean", "Treat pattern as a literal string instead of a regular expression"),
         "ignore_case": _p("boolean", "Case-insensitive search (default: false)"),
         "context_lines": _p("integer", "Number of lines of context to show before and after each match")},
        ["path", "pattern"]), grep_search),
    Tool("exec_shell_command", "Execute shell command", _fn(
        "exec_shell_command", "Execute a shell command and return its output (stdout and stderr combined).",
        {"command": _p("string", "Shell command to execute"),
         "timeout": _p("integer", f"Timeout in seconds (default 10, max {SHELL_MAX_TIMEOUT})"),
         "max_output_size": _p("integer", f"Maximum output size in bytes (default {SHELL_MAX_OUTPUT})")},
        ["command"]), exec_shell_command, write=True, streams=True),
    Tool("write_file", "Write file", _fn(
        "write_file", "Write content to a file, creating it (including parent directories) if it does not "
        "exist. May use with edit_file for more complex edits.",
        {"path": _p("string", "Path of the file to write"), "content": _p("string", "Content to write")},
        ["path", "content"]), write_file, write=True),
    Tool("edit_file", "Edit file", _fn(
        "edit_file", "Edit a file using exact text replacement. Each edits[].old_text must be unique in the "
        "file and is matched against the original content, not incrementally. Merge nearby changes into one "
        "edit instead of overlapping edits. Use write_file to replace the whole file.",
        {"path": _p("string", "Path to the file to edit"),
         "edits": {"type": "array", "description": "One or more exact text replacements to apply", "items": {
             "type": "object", "required": ["old_text", "new_text"], "properties": {
                 "old_text": _p("string", "Exact text to find; must be unique in the file and must not overlap "
                                          "with other edits"),
                 "new_text": _p("string", "Text to replace old_text with")}}}},
        ["path", "edits"]), edit_file, write=True),
    Tool("get_info", "Get Runtime Info", _fn(
        "get_info", "Returns runtime info: the OS name/version and the current working directory", {}, []),
        get_info),
]


def select_tools(spec: str) -> list[Tool]:
    """--tools "all" or a comma-separated list of names; an unknown name is an error."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = [t.name for t in TOOLS]
    for n in names:
        if n != "all" and n not in known:
            raise ValueError(f'unknown tool "{n}". available tools: {", ".join(known)}')
    return [t for t in TOOLS if "all" in names or t.name in names]


CONTAINER_ENGINES = ("docker", "podman")
SAFE_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]*")   # an ssh target; "@" aside, a container id too


def runtime_refusal(spec: str) -> str:
    """Why a tool runtime (the X-Tool-Runtime header, llama-server's isolates: "ssh:host",
    "docker-container:id", "podman-container:id") cannot be used: numllama runs tools on this
    machine only, and a request that asks for an isolate must never fall back to the host. The
    malformed ones get llama-server's own words (a value starting with "-" would have become an
    option of ssh or docker)."""
    for engine in CONTAINER_ENGINES:
        if spec.startswith(engine + "-container:"):
            ident = spec[len(engine) + len("-container:"):]
            if not SAFE_TARGET.fullmatch(ident) or "@" in ident:
                return f"invalid container id: {ident}"
            return f"tool runtime {spec!r} is not supported by numllama (its tools run on this machine only)"
        if spec.startswith(engine + ":"):
            return f"tool runtime must name a running container: {spec}"
    if spec.startswith("ssh:"):
        if not SAFE_TARGET.fullmatch(spec[4:]):
            return f"invalid ssh target: {spec[4:]}"
        return f"tool runtime {spec!r} is not supported by numllama (its tools run on this machine only)"
    return f"unknown tool runtime: {spec}"


def mcp_tools(servers, taken: set) -> list[Tool]:
    """An MCP server's tools as agent tools named "<server>_<tool>" (webapp/mcp_servers.py); a
    name already taken (by a built-in tool or another server's) is skipped."""
    out = []
    for t in servers.tools:
        name = f"{t.server}_{t.name}"
        if name in taken:
            log.warning("MCP tool %r of server %r collides with an existing tool, skipping", name, t.server)
            continue
        taken.add(name)
        definition = {"type": "function", "function": {"name": name, "description": t.description,
                                                       "parameters": t.input_schema}}

        def run(params, emit, server=t.server, tool=t.name):
            return servers.call(server, tool, params)
        out.append(Tool(name, name, definition, run, kind="mcp", uses_cwd=False))
    return out

"""JSON Schema -> GBNF grammar, rule for rule as llama.cpp writes it.

llama-server turns a request's `json_schema` (or `response_format`) into a grammar with
common/json-schema.cpp (the schema becomes a tree of typed nodes) and
common/json-schema-to-grammar.cpp (each node becomes a rule). The grammar's exact text matters:
the same language written with other rules can still sample other tokens, since where optional
whitespace is allowed decides which tokens are possible. So this module follows those two files
step by step: the same node kinds, the same rule names, the same primitive rules, the same
order (rules sorted by name, as their std::map keeps them). Its tests are llama.cpp's own
(tests/test-json-schema-to-grammar.cpp: schema in, grammar text out).

    >>> print(json_schema_to_grammar({"type": "integer", "minimum": 1}))
    root ::= ([1-9] [0-9]{0,15})
    space ::= | " " | "\\n"{1,2} [ \\t]{0,20}
    <BLANKLINE>
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .grammar import GrammarError

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1   # int64: "no bound"
COUNT_MAX = (1 << 31) - 1                       # int: "no upper count"
MAX_PATTERN_DEPTH = 100

SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

# name: (rule, the rules it needs)
PRIMITIVE_RULES = {
    "boolean": ('("true" | "false")', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)?',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part)', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? space "}"',
               ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? space "]"', ("value",)),
    "uuid": ('"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
             '[0-9a-fA-F]{12} "\\""', ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\""', ("char",)),
    "null": ('"null"', ()),
}
STRING_FORMAT_RULES = {
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\""', ("date",)),
    "time-string": ('"\\"" time "\\""', ("time",)),
    "date-time-string": ('"\\"" date-time "\\""', ("date-time",)),
}
RESERVED_NAMES = {"root", *PRIMITIVE_RULES, *STRING_FORMAT_RULES}

INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
LITERAL_ESCAPES = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
NON_LITERAL = set("|.()[]{}*+?^$")
ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS = set("^$.[]()|{}*+?")


# ---------------------------------------------------------------- the schema as typed nodes
@dataclass
class Node:
    kind: str   # ref any_of all_of const enum object tuple array string integer number boolean null any
    children: list = field(default_factory=list)      # any_of, all_of: nodes; tuple: items
    value: object = None                               # const: the value; enum: the values; ref: "#/..."
    properties: list = field(default_factory=list)    # object: (name, node, required)
    additional: "Node | None" = None                   # object: additionalProperties (None: none allowed)
    items: "Node | None" = None                        # array
    min_count: int = 0                                 # array: minItems; string: minLength
    max_count: int = -1                                # array: maxItems; string: maxLength (-1: none)
    pattern: str = ""                                  # string
    format: str = ""                                   # string: "", "date", "time", "date-time", "uuid"
    minimum: int = INT_MIN                             # integer
    maximum: int = INT_MAX                             # integer
    target: "Node | None" = None                       # ref: the node it points at


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _SchemaBuilder:
    """common_chat_schema_builder: a JSON schema -> Node tree, $refs into the same document."""

    def __init__(self, root):
        self.root = root
        self.refs: dict[str, Node | None] = {}
        self.pending: list[Node] = []

    @staticmethod
    def fail(path: str, msg: str):
        raise GrammarError(f"JSON schema error at {path}: {msg}")

    def count(self, schema: dict, key: str, path: str, default: int) -> int:
        if key not in schema:
            return default
        v = schema[key]
        if not _is_int(v) or v < 0:
            self.fail(path, f"{key} must be a non-negative integer")
        return v

    def bound(self, schema: dict, key: str, path: str, round_up: bool) -> int:
        v = schema[key]   # a fractional bound is rounded inwards, towards the integers it admits
        if _is_int(v):
            return v
        if not isinstance(v, float):
            self.fail(path, f"{key} must be a number")
        return int(math.ceil(v) if round_up else math.floor(v))

    def format(self, schema: dict, path: str) -> str:
        if "format" not in schema:
            return ""
        f = schema["format"]
        if not isinstance(f, str):
            self.fail(path, "format must be a string")
        if f in ("date", "time", "date-time"):
            return f
        if f == "uuid" or (len(f) == 5 and f.startswith("uuid") and "1" <= f[4] <= "5"):
            return "uuid"
        return ""

    def resolve(self, ref: str, path: str):
        target = self.root
        for sel in ref[1:].split("/")[1:]:
            if isinstance(target, dict) and sel in target:
                target = target[sel]
            elif isinstance(target, list):
                idx = int(sel) if sel.isdigit() else len(target)
                if idx >= len(target):
                    self.fail(path, f"cannot resolve $ref {ref}, {sel} is out of range")
                target = target[idx]
            else:
                self.fail(path, f"cannot resolve $ref {ref}, {sel} not found")
        return target

    def ref(self, value, path: str) -> Node:
        if not isinstance(value, str):
            self.fail(path, "$ref must be a string")
        if not value.startswith("#/"):
            self.fail(path, f"unsupported $ref {value}, only references into the same document are supported")
        if value not in self.refs:
            self.refs[value] = None   # reserved first: a cycle back to this $ref stops here
            self.refs[value] = self.node(self.resolve(value, path), value)
        node = Node("ref", value=value)
        self.pending.append(node)
        return node

    def alternatives(self, kind: str, alts, path: str) -> Node:
        if not isinstance(alts, list):
            self.fail(path, "must be an array of schemas")
        if not alts:
            self.fail(path, "must not be empty")
        return Node(kind, children=[self.node(a, f"{path}/{i}") for i, a in enumerate(alts)])

    def object(self, schema: dict, path: str) -> Node:
        node = Node("object")
        required = {r for r in schema.get("required", []) if isinstance(r, str)} \
            if isinstance(schema.get("required"), list) else set()
        if "properties" in schema:
            props = schema["properties"]
            if not isinstance(props, dict):
                self.fail(path, "properties must be an object")
            node.properties = [(name, self.node(p, f"{path}/properties/{name}"), name in required)
                               for name, p in props.items()]
        if "additionalProperties" in schema:
            extra = schema["additionalProperties"]
            if isinstance(extra, bool):
                node.additional = Node("any") if extra else None
            elif isinstance(extra, dict):
                node.additional = self.node(extra, f"{path}/additionalProperties")
            else:
                self.fail(path, "additionalProperties must be a boolean or a schema")
        elif "properties" not in schema:
            node.additional = Node("any")   # {"type": "object"} on its own accepts any object
        return node

    def array(self, schema: dict, path: str) -> Node:
        node = Node("array", items=Node("any"))
        if "items" in schema or "prefixItems" in schema:
            key = "items" if "items" in schema else "prefixItems"
            items = schema[key]
            if isinstance(items, list):
                return Node("tuple", children=[self.node(x, f"{path}/{key}/{i}") for i, x in enumerate(items)])
            node.items = self.node(items, f"{path}/{key}")
        node.min_count = self.count(schema, "minItems", path, 0)
        node.max_count = self.count(schema, "maxItems", path, -1)
        return node

    def string(self, schema: dict, path: str) -> Node:
        node = Node("string")
        if "pattern" in schema:
            if not isinstance(schema["pattern"], str):
                self.fail(path, "pattern must be a string")
            node.pattern = schema["pattern"]
        node.format = self.format(schema, path)
        node.min_count = self.count(schema, "minLength", path, 0)
        node.max_count = self.count(schema, "maxLength", path, -1)
        return node

    def integer(self, schema: dict, path: str) -> Node:
        node = Node("integer")
        if "minimum" in schema:
            node.minimum = self.bound(schema, "minimum", path, True)
        elif "exclusiveMinimum" in schema:
            node.minimum = self.bound(schema, "exclusiveMinimum", path, False) + 1
        if "maximum" in schema:
            node.maximum = self.bound(schema, "maximum", path, False)
        elif "exclusiveMaximum" in schema:
            node.maximum = self.bound(schema, "exclusiveMaximum", path, True) - 1
        return node

    def node(self, schema, path: str) -> Node:
        if not isinstance(schema, dict):
            self.fail(path, "schema must be an object")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path)
        if "oneOf" in schema or "anyOf" in schema:
            key = "oneOf" if "oneOf" in schema else "anyOf"
            return self.alternatives("any_of", schema[key], f"{path}/{key}")
        t = schema.get("type")
        if isinstance(t, list):   # {"type": ["a", "b"], ...} is {"anyOf": [{"type": "a", ...}, ...]}
            if not t:
                self.fail(path, "type must not be empty")
            return Node("any_of", children=[self.node({**schema, "type": x}, f"{path}/type/{i}")
                                            for i, x in enumerate(t)])
        if "const" in schema:
            return Node("const", value=schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                self.fail(path, "enum must be a non-empty array")
            return Node("enum", value=list(values))
        if t is not None and not isinstance(t, str):
            self.fail(path, "type must be a string or an array of strings")
        has_properties = "properties" in schema or \
            ("additionalProperties" in schema and schema["additionalProperties"] is not True)
        if not t:   # without a type the structural keywords decide, in the converter's order
            if has_properties:
                return self.object(schema, path)
            if "allOf" in schema:
                return self.alternatives("all_of", schema["allOf"], f"{path}/allOf")
            if "items" in schema or "prefixItems" in schema:
                return self.array(schema, path)
            if "pattern" in schema or "minLength" in schema or "maxLength" in schema or self.format(schema, path):
                return self.string(schema, path)
            return Node("any")
        if t == "object":
            if not has_properties and "allOf" in schema:
                return self.alternatives("all_of", schema["allOf"], f"{path}/allOf")
            return self.object(schema, path)
        if t == "string":
            if "allOf" in schema:
                return self.alternatives("all_of", schema["allOf"], f"{path}/allOf")
            return self.string(schema, path)
        if t == "array":
            return self.array(schema, path)
        if t == "integer":
            return self.integer(schema, path)
        if t in ("number", "boolean", "null"):
            return Node(t)
        self.fail(path, f"unrecognized type {t}")

    def build(self) -> Node:
        root = self.node(self.root, "#")
        for node in self.pending:
            node.target = self.refs[node.value]
        return root


# ---------------------------------------------------------------- grammar text helpers
def _dump(value) -> str:
    """nlohmann::json::dump(): compact, UTF-8 kept."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def format_literal(literal: str) -> str:
    return '"' + "".join(LITERAL_ESCAPES.get(c, c) for c in literal) + '"'


def build_repetition(item_rule: str, min_items: int, max_items: int, separator_rule: str = "") -> str:
    has_max = max_items != COUNT_MAX
    if max_items == 0:
        return ""
    if min_items == 0 and max_items == 1:
        return item_rule + "?"
    if not separator_rule:
        if min_items == 1 and not has_max:
            return item_rule + "+"
        if min_items == 0 and not has_max:
            return item_rule + "*"
        return item_rule + "{" + str(min_items) + "," + (str(max_items) if has_max else "") + "}"
    result = item_rule + " " + build_repetition(f"({separator_rule} {item_rule})", 0 if min_items == 0 else min_items - 1,
                                                max_items - 1 if has_max else max_items)
    return f"({result})?" if min_items == 0 else result


def build_min_max_int(min_value: int, max_value: int, out: list, decimals_left: int = 16, top_level: bool = True):
    """The digits of the integers in [min_value, max_value] as grammar text, appended to out."""
    has_min, has_max = min_value != INT_MIN, max_value != INT_MAX

    def digit_range(lo: str, hi: str):
        out.append("[" + (lo if lo == hi else f"{lo}-{hi}") + "]")

    def more_digits(min_digits: int, max_digits: int):
        out.append("[0-9]")
        if min_digits == max_digits == 1:
            return
        out.append("{" + str(min_digits))
        if max_digits != min_digits:
            out.append(",")
            if max_digits != COUNT_MAX:
                out.append(str(max_digits))
        out.append("}")

    def uniform_range(lo: str, hi: str):
        i = 0
        while i < len(lo) and i < len(hi) and lo[i] == hi[i]:
            i += 1
        if i > 0:
            out.append('"' + lo[:i] + '"')
        if i < len(lo) and i < len(hi):
            if i > 0:
                out.append(" ")
            sub_len = len(lo) - i - 1
            if sub_len > 0:
                lo_sub, hi_sub = lo[i + 1:], hi[i + 1:]
                zeros, nines = "0" * sub_len, "9" * sub_len
                to_reached = False
                out.append("(")
                if lo_sub == zeros:
                    digit_range(lo[i], chr(ord(hi[i]) - 1))
                    out.append(" ")
                    more_digits(sub_len, sub_len)
                else:
                    out.append(f"[{lo[i]}] (")
                    uniform_range(lo_sub, nines)
                    out.append(")")
                    if ord(lo[i]) < ord(hi[i]) - 1:
                        out.append(" | ")
                        if hi_sub == nines:
                            digit_range(chr(ord(lo[i]) + 1), hi[i])
                            to_reached = True
                        else:
                            digit_range(chr(ord(lo[i]) + 1), chr(ord(hi[i]) - 1))
                        out.append(" ")
                        more_digits(sub_len, sub_len)
                if not to_reached:
                    out.append(" | ")
                    digit_range(hi[i], hi[i])
                    out.append(" ")
                    uniform_range(zeros, hi_sub)
                out.append(")")
            else:
                out.append(f"[{lo[i]}-{hi[i]}]")

    if has_min and has_max:
        if min_value < 0 and max_value < 0:
            out.append('"-" (')
            build_min_max_int(-max_value, -min_value, out, decimals_left, True)
            out.append(")")
            return
        if min_value < 0:
            out.append('"-" (')
            build_min_max_int(0, -min_value, out, decimals_left, True)
            out.append(") | ")
            min_value = 0
        min_s, max_s = str(min_value), str(max_value)
        for digits in range(len(min_s), len(max_s)):
            uniform_range(min_s, "9" * digits)
            min_s = "1" + "0" * digits
            out.append(" | ")
        uniform_range(min_s, max_s)
        return
    less_decimals = max(decimals_left - 1, 1)
    if has_min:
        if min_value < 0:
            out.append('"-" (')
            build_min_max_int(INT_MIN, -min_value, out, decimals_left, False)
            out.append(") | [0] | [1-9] ")
            more_digits(0, decimals_left - 1)
        elif min_value == 0:
            if top_level:
                out.append("[0] | [1-9] ")
                more_digits(0, less_decimals)
            else:
                more_digits(1, decimals_left)
        elif min_value <= 9:
            c = str(min_value)
            start = "1" if top_level else "0"
            if c > start:
                digit_range(start, chr(ord(c) - 1))
                out.append(" ")
                more_digits(1, less_decimals)
                out.append(" | ")
            digit_range(c, "9")
            out.append(" ")
            more_digits(0, less_decimals)
        else:
            min_s = str(min_value)
            c = min_s[0]
            if c > "1":
                digit_range("1" if top_level else "0", chr(ord(c) - 1))
                out.append(" ")
                more_digits(len(min_s), less_decimals)
                out.append(" | ")
            digit_range(c, c)
            out.append(" (")
            build_min_max_int(int(min_s[1:]), INT_MAX, out, less_decimals, False)
            out.append(")")
            if c < "9":
                out.append(" | ")
                digit_range(chr(ord(c) + 1), "9")
                out.append(" ")
                more_digits(len(min_s) - 1, less_decimals)
        return
    if has_max:
        if max_value >= 0:
            if top_level:
                out.append('"-" [1-9] ')
                more_digits(0, less_decimals)
                out.append(" | ")
            build_min_max_int(0, max_value, out, decimals_left, True)
        else:
            out.append('"-" (')
            build_min_max_int(-max_value, INT_MAX, out, decimals_left, False)
            out.append(")")
        return
    raise GrammarError("At least one of min_value or max_value must be set")


def _escape_length(pattern: str, pos: int) -> int:
    """Length of the GBNF escape at pos (\\x.., \\u...., \\U........, \\t \\r \\n \\\\ \\" \\[ \\] \\-), or 0."""
    if pos + 1 >= len(pattern) or pattern[pos] != "\\":
        return 0
    n_hex = {"x": 2, "u": 4, "U": 8}.get(pattern[pos + 1])
    if n_hex is None:
        return 2 if pattern[pos + 1] in 'trn\\"[]-' else 0
    digits = pattern[pos + 2:pos + 2 + n_hex]
    if len(digits) < n_hex or any(h not in "0123456789abcdefABCDEF" for h in digits):
        return 0
    return 2 + n_hex


class _UnsupportedPattern(Exception):
    """A valid regex without a grammar equivalent: the string is then any string."""


class _InvalidPattern(Exception):
    """Not a valid regex."""


# ---------------------------------------------------------------- the converter
class SchemaConverter:
    """common_chat_schema_converter: nodes -> rules."""

    def __init__(self, dotall: bool = False):
        self.dotall = dotall
        self.rules: dict[str, str] = {"space": SPACE_RULE}
        self.refs_being_resolved: set[str] = set()
        self.errors: list[str] = []

    def add_rule(self, name: str, rule: str) -> str:
        esc = INVALID_RULE_CHARS.sub("-", name)
        if esc not in self.rules or self.rules[esc] == rule:
            self.rules[esc] = rule
            return esc
        i = 0
        while f"{esc}{i}" in self.rules and self.rules[f"{esc}{i}"] != rule:
            i += 1
        self.rules[f"{esc}{i}"] = rule
        return f"{esc}{i}"

    def add_primitive(self, name: str, rule: tuple) -> str:
        content, deps = rule
        n = self.add_rule(name, content)
        for dep in deps:
            dep_rule = PRIMITIVE_RULES.get(dep) or STRING_FORMAT_RULES.get(dep)
            if dep_rule is None:
                self.errors.append(f"Rule {dep} not known")
                continue
            if dep not in self.rules:
                self.add_primitive(dep, dep_rule)
        return n

    def union(self, name: str, alts: list) -> str:
        return " | ".join(self.visit(a, name + ("alternative-" if not name else "-") + str(i)) for i, a in enumerate(alts))

    def visit_pattern(self, pattern: str, name: str) -> str:
        snapshot = dict(self.rules)
        try:
            return self.pattern_to_rule(pattern, name)
        except _UnsupportedPattern:   # llama.cpp warns and accepts any string
            self.rules = snapshot
            return self.add_rule(name, self.add_primitive("string", PRIMITIVE_RULES["string"]))
        except _InvalidPattern as e:
            self.rules = snapshot
            self.errors.append(f"Invalid pattern {pattern}: {e}")
            return ""

    def pattern_to_rule(self, pattern: str, name: str) -> str:
        if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
            raise _UnsupportedPattern("not anchored with '^' and '$'")
        sub = pattern[1:-1]
        sub_rule_ids: dict[str, str] = {}
        n = len(sub)
        pos = 0
        depth = 0

        def to_rule(item):
            text, is_literal = item
            return f'"{text}"' if is_literal else text

        def transform():
            nonlocal pos, depth
            seq: list = []

            def join_seq():
                out, literal = [], ""
                for text, is_literal in seq:
                    if is_literal:
                        literal += text
                    else:
                        if literal:
                            out.append((literal, True))
                            literal = ""
                        out.append((text, False))
                if literal:
                    out.append((literal, True))
                return " ".join(to_rule(x) for x in out), False

            while pos < n:
                c = sub[pos]
                if c == ".":
                    seq.append((self.add_rule("dot", "[\\U00000000-\\U0010FFFF]" if self.dotall else "[^\\x0A\\x0D]"),
                                False))
                    pos += 1
                elif c == "(":
                    pos += 1
                    if pos < n and sub[pos] == "?":
                        if pos + 1 < n and sub[pos + 1] == ":":
                            pos += 2
                        else:
                            raise _UnsupportedPattern("unsupported group syntax")
                    depth += 1
                    if depth > MAX_PATTERN_DEPTH:
                        raise _UnsupportedPattern("pattern nesting too deep")
                    seq.append(("(" + to_rule(transform()) + ")", False))
                elif c == ")":
                    pos += 1
                    if depth == 0:
                        raise _InvalidPattern("unbalanced parentheses")
                    depth -= 1
                    return join_seq()
                elif c in "^$":
                    raise _UnsupportedPattern("anchor inside the pattern")
                elif c == "[":
                    brackets = "["
                    pos += 1
                    while pos < n and sub[pos] != "]":
                        if sub[pos] == "\\":
                            k = _escape_length(sub, pos)
                            if k == 0:
                                raise _UnsupportedPattern("unsupported escape in character class")
                            brackets += sub[pos:pos + k]
                            pos += k
                        else:
                            brackets += sub[pos]
                            pos += 1
                    if pos >= n:
                        raise _InvalidPattern("unterminated character class")
                    seq.append((brackets + "]", False))
                    pos += 1
                elif c == "|":
                    seq.append(("|", False))
                    pos += 1
                elif c in "*+?":
                    if not seq:
                        raise _InvalidPattern("nothing to repeat")
                    seq[-1] = (to_rule(seq[-1]) + c, False)
                    pos += 1
                elif c == "{":
                    end = sub.find("}", pos)
                    if end < 0:
                        raise _UnsupportedPattern("unterminated curly brackets")
                    nums = sub[pos + 1:end].split(",")
                    pos = end + 1
                    if len(nums) not in (1, 2):
                        raise _UnsupportedPattern("wrong number of values in curly brackets")
                    try:
                        if len(nums) == 1:
                            lo = hi = int(nums[0])
                        else:
                            lo = int(nums[0]) if nums[0] else 0
                            hi = int(nums[1]) if nums[1] else COUNT_MAX
                    except ValueError:
                        raise _UnsupportedPattern("invalid number in curly brackets") from None
                    if not seq:
                        raise _InvalidPattern("nothing to repeat")
                    text, is_literal = seq[-1]
                    if not is_literal:
                        if text not in sub_rule_ids:
                            sub_rule_ids[text] = ""   # (counted before its name is made, as in C++)
                            sub_rule_ids[text] = self.add_rule(f"{name}-{len(sub_rule_ids)}", text)
                        text = sub_rule_ids[text]
                    seq[-1] = (build_repetition(f'"{text}"' if is_literal else text, lo, hi), False)
                else:
                    literal = ""
                    while pos < n:
                        if sub[pos] == "\\":
                            if pos == n - 1:
                                raise _InvalidPattern("trailing backslash")
                            nxt = sub[pos + 1]
                            if nxt in ESCAPED_IN_REGEXPS_BUT_NOT_IN_LITERALS:
                                literal += nxt
                                pos += 2
                            else:
                                k = _escape_length(sub, pos)
                                if k == 0:
                                    raise _UnsupportedPattern("unsupported escape")
                                literal += sub[pos:pos + k]
                                pos += k
                        elif sub[pos] == '"':
                            literal += '\\"'
                            pos += 1
                        elif sub[pos] not in NON_LITERAL and (pos == n - 1 or not literal or sub[pos + 1] == "."
                                                              or sub[pos + 1] not in NON_LITERAL):
                            literal += sub[pos]
                            pos += 1
                        else:
                            break
                    if not literal:
                        raise _UnsupportedPattern(f"unsupported character: {c}")
                    seq.append((literal, True))
            return join_seq()

        rule = to_rule(transform())
        if depth != 0:
            raise _InvalidPattern("unbalanced parentheses")
        return self.add_rule(name, f'"\\"" ({rule}) "\\""')

    def not_strings(self, strings: list[str]) -> str:
        """A JSON string that is none of `strings` (a trie of their characters)."""
        trie: list[dict] = [{"children": {}, "end": False}]
        for s in strings:
            at = 0
            for ch in s:
                nxt = trie[at]["children"].get(ord(ch))
                if nxt is None:
                    nxt = len(trie)
                    trie.append({"children": {}, "end": False})
                    trie[at]["children"][ord(ch)] = nxt
                at = nxt
            trie[at]["end"] = True
        char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
        out = ['["] ( ']

        def visit(idx: int):
            node = trie[idx]
            rejects = ""
            for k, (cpt, child) in enumerate(sorted(node["children"].items())):
                ch = chr(cpt)
                rejects += ch
                if k:
                    out.append(" | ")
                out.append(f"[{ch}]")
                if trie[child]["children"]:
                    out.append(" (")
                    visit(child)
                    out.append(")")
                else:
                    out.append(f" {char_rule}+")
            if node["children"]:
                out.append(f' | [^"{rejects}] {char_rule}*')

        visit(0)
        out.append(" )")
        if not trie[0]["end"]:
            out.append("?")
        out.append(' ["]')
        return "".join(out)

    def resolve_ref(self, node: Node) -> str:
        ref = node.value
        fragment = ref[ref.index("#") + 1:] if "#" in ref else ref
        ref_name = "ref" + INVALID_RULE_CHARS.sub("-", fragment)
        if ref_name not in self.rules and ref not in self.refs_being_resolved:
            if node.target is None:
                self.errors.append(f"Unresolved $ref {ref}")
                return ""
            self.refs_being_resolved.add(ref)
            ref_name = self.visit(node.target, ref_name)
            self.refs_being_resolved.discard(ref)
        return ref_name

    def object_rule(self, properties: list, required: set, name: str, additional: Node | None) -> str:
        required_props, optional_props, kv_rules, prop_names = [], [], {}, []
        prefix = name + ("-" if name else "")
        for prop_name, prop_schema in properties:
            prop_rule = self.visit(prop_schema, prefix + prop_name)
            kv_rules[prop_name] = self.add_rule(prefix + prop_name + "-kv",
                                                f'{format_literal(_dump(prop_name))} space ":" space {prop_rule}')
            (required_props if prop_name in required else optional_props).append(prop_name)
            prop_names.append(prop_name)
        if additional is not None:
            sub_name = prefix + "additional"
            value_rule = self.visit(additional, sub_name + "-value") if additional.kind != "any" \
                else self.add_primitive("value", PRIMITIVE_RULES["value"])
            key_rule = self.add_primitive("string", PRIMITIVE_RULES["string"]) if not prop_names \
                else self.add_rule(sub_name + "-k", self.not_strings(prop_names))
            kv_rules["*"] = self.add_rule(sub_name + "-kv", f'{key_rule} ":" space {value_rule}')
            optional_props.append("*")
        if not required_props and not optional_props:
            return '"{" space "}"'
        rule = '"{" space ' + ' "," space '.join(kv_rules[p] for p in required_props)
        if optional_props:
            rule += " ("
            if required_props:
                rule += ' "," space ( '

            def recursive_refs(keys: list, first_is_optional: bool) -> str:
                if not keys:
                    return ""
                k = keys[0]
                comma_ref = f'( "," space {kv_rules[k]} )'
                if first_is_optional:
                    res = comma_ref + ("*" if k == "*" else "?")
                else:
                    res = kv_rules[k] + (" " + comma_ref + "*" if k == "*" else "")
                if len(keys) > 1:
                    res += " " + self.add_rule(prefix + k + "-rest", recursive_refs(keys[1:], True))
                return res

            rule += " | ".join(recursive_refs(optional_props[i:], False) for i in range(len(optional_props)))
            if required_props:
                rule += " )"
            rule += " )?"
        return rule + ' space "}"'

    def visit_primitive(self, rule_name: str, type_name: str) -> str:
        return self.add_primitive("root" if rule_name == "root" else type_name, PRIMITIVE_RULES[type_name])

    def visit_all_of(self, node: Node, name: str, rule_name: str) -> str:
        required, properties, enum_values = set(), [], {}

        def add_component(comp: Node, is_required: bool):
            if comp.kind == "ref":
                if comp.target is not None:
                    add_component(comp.target, is_required)
            elif comp.kind == "object":
                for prop_name, prop_schema, _ in comp.properties:
                    properties.append((prop_name, prop_schema))
                    if is_required:
                        required.add(prop_name)
            elif comp.kind == "enum":
                for v in comp.value:
                    lit = format_literal(_dump(v))
                    enum_values[lit] = enum_values.get(lit, 0) + 1

        for child in node.children:
            if child.kind == "any_of":
                for alt in child.children:
                    add_component(alt, False)
            else:
                add_component(child, True)
        if enum_values:
            common = [v for v in sorted(enum_values) if enum_values[v] == len(node.children)]
            if common:
                return self.add_rule(rule_name, "(" + " | ".join(common) + ")")
        return self.add_rule(rule_name, self.object_rule(properties, required, name, None))

    def visit(self, node: Node, name: str) -> str:
        rule_name = name + "-" if name in RESERVED_NAMES else (name or "root")
        sub_name = name + ("-" if name else "")
        k = node.kind
        if k == "ref":
            return self.add_rule(rule_name, self.resolve_ref(node))
        if k == "any_of":
            return self.add_rule(rule_name, self.union(name, node.children))
        if k == "all_of":
            return self.visit_all_of(node, name, rule_name)
        if k == "const":
            return self.add_rule(rule_name, format_literal(_dump(node.value)))
        if k == "enum":
            return self.add_rule(rule_name, "(" + " | ".join(format_literal(_dump(v)) for v in node.value) + ")")
        if k == "object":
            if not node.properties and node.additional is not None and node.additional.kind == "any":
                return self.add_rule(rule_name, self.add_primitive("object", PRIMITIVE_RULES["object"]))
            return self.add_rule(rule_name, self.object_rule([(n, s) for n, s, _ in node.properties],
                                                             {n for n, _, r in node.properties if r},
                                                             name, node.additional))
        if k == "tuple":
            items = ' "," space '.join(self.visit(item, f"{sub_name}tuple-{i}") for i, item in enumerate(node.children))
            return self.add_rule(rule_name, f'"[" space {items} space "]"')
        if k == "array":
            if node.items.kind == "any" and node.min_count == 0 and node.max_count < 0:
                return self.visit_primitive(rule_name, "array")
            item = self.visit(node.items, sub_name + "item")
            max_items = COUNT_MAX if node.max_count < 0 else node.max_count
            return self.add_rule(rule_name, '"[" space ' + build_repetition(item, node.min_count, max_items, '"," space')
                                 + ' space "]"')
        if k == "string":
            if node.pattern:
                return self.visit_pattern(node.pattern, rule_name)
            if node.format == "uuid":
                return self.visit_primitive(rule_name, "uuid")
            if node.format:
                prim = node.format + "-string"
                return self.add_rule(rule_name, self.add_primitive(prim, STRING_FORMAT_RULES[prim]))
            if node.min_count > 0 or node.max_count >= 0:
                char_rule = self.add_primitive("char", PRIMITIVE_RULES["char"])
                max_len = COUNT_MAX if node.max_count < 0 else node.max_count
                return self.add_rule(rule_name, '"\\"" ' + build_repetition(char_rule, node.min_count, max_len) + ' "\\""')
            return self.visit_primitive(rule_name, "string")
        if k == "integer":
            if node.minimum == INT_MIN and node.maximum == INT_MAX:
                return self.visit_primitive(rule_name, "integer")
            out = ["("]
            build_min_max_int(node.minimum, node.maximum, out)
            out.append(")")
            return self.add_rule(rule_name, "".join(out))
        if k in ("number", "boolean", "null"):
            return self.visit_primitive(rule_name, k)
        return self.add_rule(rule_name, self.add_primitive("value", PRIMITIVE_RULES["value"]))   # any

    def format_grammar(self) -> str:
        # std::map orders its keys by bytes
        return "".join(f"{k} ::= {self.rules[k]}\n" for k in sorted(self.rules, key=lambda s: s.encode()))


def json_schema_to_grammar(schema) -> str:
    """llama.cpp's json_schema_to_grammar: the schema's grammar text, or GrammarError."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise GrammarError(f"invalid JSON schema: {e}") from None
    converter = SchemaConverter(dotall=False)
    converter.visit(_SchemaBuilder(schema).build(), "")
    if converter.errors:
        raise GrammarError("JSON schema conversion failed:\n" + "\n".join(converter.errors))
    return converter.format_grammar()


# llama-server's chat route does not constrain a response_format with the schema's grammar alone:
# its chat parser (common/chat-auto-parser-generator.cpp, for templates without a reasoning
# block) accepts the JSON after optional whitespace, bare or in a ```json fence. After the
# generation prompt (which it feeds to the grammar first), its grammar's language is this:
CHAT_RESPONSE_FORMAT_ROOT = 'root ::= space space ("```json" space response-format space "```" | space response-format space)'


def chat_response_format_grammar(schema) -> str:
    """The grammar of a chat request's response_format, as llama-server's chat parser builds it
    (same language; the schema's own rules come from json_schema_to_grammar)."""
    lines = json_schema_to_grammar(schema).splitlines()
    renamed = ["response-format ::= " + line[len("root ::= "):] if line.startswith("root ::= ") else line for line in lines]
    return "\n".join(sorted(renamed + [CHAT_RESPONSE_FORMAT_ROOT])) + "\n"

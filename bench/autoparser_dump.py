"""Keep, of bench/autoparser_dump.cpp's output, the templates llama.cpp's analysis reads as
tagged tool calls (TAG_WITH_JSON, TAG_WITH_TAGGED) and the fields engine/tagged_tool_calls.py
models: the golden file tests/data/autoparser-analysis.json.

    python3 bench/autoparser_dump.py analysis.json > tests/data/autoparser-analysis.json
"""
import json
import sys

FIELDS = ("tool_mode", "reasoning_start", "reasoning_end", "section_start", "section_end", "per_call_start",
          "per_call_end", "name_prefix", "name_suffix", "args_separator", "close", "call_id_pos", "call_id_prefix",
          "call_id_suffix", "arg_name_prefix", "arg_name_suffix", "arg_value_prefix", "arg_value_suffix",
          "arg_separator", "tolerate_ws", "additional_stops")


def main() -> None:
    analysis = json.load(open(sys.argv[1]))
    kept = {name.removesuffix(".jinja"): {k: a[k] for k in FIELDS} for name, a in sorted(analysis.items())
            if a.get("tool_mode") in ("TAG_WITH_JSON", "TAG_WITH_TAGGED")}
    json.dump({"producer": "bench/autoparser_dump.cpp over the llama-cpp-python 0.3.36 sdist's models/templates",
               "templates": kept}, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()

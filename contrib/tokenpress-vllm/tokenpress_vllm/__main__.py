"""``python -m tokenpress_vllm MODEL STACK...``: the ``vllm serve`` command line that serves MODEL with the
stacks (each a YAML file, or NAME=FILE to name it), checked against the model first; a stack vLLM cannot
serve is refused in one line (exit code 2)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from tokenpress.core.errors import TokenpressError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenpress_vllm", description=__doc__)
    parser.add_argument("model", help="zoo:NAME or a checkpoint folder")
    parser.add_argument("stacks", nargs="+", metavar="STACK", help="a stack file, or NAME=FILE")
    parser.add_argument("--default", help="the stack a request that chooses none gets (default: the first)")
    parser.add_argument("--json", action="store_true", help="print only the --hf-overrides JSON")
    args = parser.parse_args(argv)

    import tokenpress_vllm
    from tokenpress.core.stack import load_stack

    named = {}
    try:
        for item in args.stacks:
            name, _, path = item.rpartition("=")
            stack = load_stack(path)
            named[name or stack.name] = stack
        engine = tokenpress_vllm.engine_args(args.model, named, args.default)
    except TokenpressError as exc:
        print(f"tokenpress-vllm: {exc}", file=sys.stderr)
        return 2
    overrides = json.dumps(engine["hf_overrides"], separators=(",", ":"))
    if args.json:
        print(overrides)
    else:
        print(shlex.join(["vllm", "serve", engine["model"], "--hf-overrides", overrides]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

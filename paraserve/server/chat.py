"""`paraserve chat`: a terminal chat that streams the reply as it is generated."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def run_chat(args: argparse.Namespace, engine_kwargs: dict[str, Any], params) -> int:
    from paraserve.llm import LLM

    llm = LLM(**engine_kwargs)
    engine = llm.engine
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("paraserve chat: type a message, /reset to start over, Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = llm.apply_chat_template(history)
        rid = engine.add_request(None, {"prompt_token_ids": ids}, params.clone_for_child(0))
        shown = ""
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    text = out.outputs[0].text
                    if text.startswith(shown):
                        sys.stdout.write(text[len(shown):])
                        sys.stdout.flush()
                        shown = text
        except KeyboardInterrupt:
            engine.abort_request([rid])
        print()
        history.append({"role": "assistant", "content": shown})

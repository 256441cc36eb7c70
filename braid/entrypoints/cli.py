"""`braid` command line: generate and chat on the default model unless told otherwise."""
from __future__ import annotations

import argparse
import logging
import sys

import braid
from braid.engine.arg_utils import EngineArgs


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="send the prompt as raw text instead of through the tokenizer's chat template")


def _sampling_params(args: argparse.Namespace):
    from braid.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.sampling_seed)


def _stream(engine, prompt, params, out=sys.stdout) -> str:
    """Run one request to completion, writing its text as it grows."""
    engine.add_request("cli", prompt, params)
    printed = ""
    while engine.has_unfinished_requests():
        for output in engine.step():
            text = output.outputs[0].text
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write("\n")
    return printed


def _chat_prompt(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def cmd_generate(args: argparse.Namespace) -> int:
    from braid.engine.llm_engine import LLMEngine

    params = _sampling_params(args)  # a bad value fails before the model loads
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    prompt = args.prompt
    if not args.no_chat_template and _has_chat_template(engine.tokenizer):
        prompt = _chat_prompt(engine.tokenizer, [{"role": "user", "content": args.prompt}])
    _stream(engine, prompt, params)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from braid.engine.llm_engine import LLMEngine

    params = _sampling_params(args)  # a bad value fails before the model loads
    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    if not _has_chat_template(engine.tokenizer):
        print("this model's tokenizer has no chat template", file=sys.stderr)
        return 2
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = _stream(engine, _chat_prompt(engine.tokenizer, messages), params)
        except ValueError as e:  # e.g. the conversation outgrew the context
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braid", description="braid LLM inference engine")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--version", action="version", version=f"braid {braid.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt and print the result")
    gen.add_argument("prompt")
    EngineArgs.add_cli_args(gen, model_positional=False)
    _add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat on stdin/stdout (/exit to quit)")
    EngineArgs.add_cli_args(chat, model_positional=False)
    _add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    from braid.bench.cli import add_bench_subparsers
    from braid.entrypoints.api_server import add_serve_parser

    add_serve_parser(sub)

    add_bench_subparsers(sub)
    from braid.observe.trace_cli import add_trace_subparsers

    add_trace_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:
        print(f"braid: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`lorakit generate`: complete one prompt with a base model and (optionally) an adapter."""

from __future__ import annotations

from ..cli_args import add_device, add_ignore_fingerprint


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt (chat template applied; greedy by default)")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default="default", help="'default', a local HF model directory or a .gguf file")
    p.add_argument("--adapter", help="adapter directory to apply")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument(
        "--system", help="system prompt (default: the one every training row of --adapter's run shared, if any; "
        "'' for none)",
    )  # fmt: skip
    p.add_argument(
        "--chat-template", metavar="FILE|NAME", help="default: the run's saved template, else the tokenizer's"
    )
    p.add_argument("--quantize", choices=("none", "4bit", "8bit"), default="none")
    add_device(p)
    add_ignore_fingerprint(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.templates import saved_template, set_chat_template
    from ..generation import generate_text
    from ..models import load_model
    from .run_defaults import saved_system

    model, tokenizer = load_model(
        args.model, quantize=args.quantize, device=args.device, adapter=args.adapter,
        ignore_fingerprint=args.ignore_fingerprint,
    )  # fmt: skip
    set_chat_template(tokenizer, args.chat_template or saved_template(args.adapter))
    system = args.system if args.system is not None else (None if args.raw else saved_system(args.adapter))
    text = generate_text(
        model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.seed, chat=not args.raw,
        system=system or None,
    )  # fmt: skip
    print(text)
    return 0

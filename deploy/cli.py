"""`pdserve` command line: up (start a local cluster), generate (stream a completion), info, bench (load)."""
from __future__ import annotations

import argparse
import os
import sys

from deploy.cli_args import INT32_MAX, UINT64_MAX, HelpFormatter, host_port, positive, seconds, whole_number
from deploy.cli_checks import UsageError
from deploy.cli_up import add_up_flags, cmd_up


def _add_client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="127.0.0.1:50051", help="the router's gRPC address (host:port)")
    p.add_argument("--tls-ca", default=None,
                   help="PEM CA certificate to verify a TLS router with (the server's --tls-cert when "
                        "self-signed); without it the connection is plaintext")
    p.add_argument("--auth-token-file", default=None,
                   help="file holding the bearer token the router was started with (its --auth-token-file)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated prefill/decode LLM serving.",
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{up,generate,info,scale,bench}")

    def command(name: str, help: str) -> argparse.ArgumentParser:  # noqa: A002  (argparse's name)
        p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        p.set_defaults(command_parser=p)  # so errors found after parsing print this command's usage
        return p

    up = command("up", "start router + prefill + decode workers on this machine")
    add_up_flags(up)

    gen = command("generate", "stream a completion from a running cluster")
    gen.add_argument("prompt", help="the prompt (a user message, or raw text with --raw)")
    _add_client_flags(gen)
    gen.add_argument("--raw", action="store_true", help="send the prompt as raw text (no chat template)")
    gen.add_argument("--system", default=None, help="system message (chat mode)")
    gen.add_argument("--max-tokens", type=whole_number("--max-tokens", 1, INT32_MAX), default=None,
                     help="most tokens to generate (default: the server's, within the context window)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="sampling temperature (default: 0, greedy)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: 1, off)")
    gen.add_argument("--top-k", type=whole_number("--top-k", 0, INT32_MAX), default=None,
                     help="sample among the k likeliest (default: 0, off)")
    gen.add_argument("--seed", type=whole_number("--seed", 0, UINT64_MAX), default=None,
                     help="sampling seed: the same seed gives the same text (default: random)")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-text token")
    gen.add_argument("--timeout", type=seconds("--timeout", allow_zero=False), default=None,
                     help="deadline in seconds (default: none)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object at the end: the text and the final message")

    scale = command("scale", "change the number of workers of a running cluster (drains before removing)")
    scale.add_argument("--prefill", type=positive("--prefill"), default=None,
                       help="prefill workers wanted (default: unchanged)")
    scale.add_argument("--decode", type=positive("--decode"), default=None,
                       help="decode workers wanted (default: unchanged)")
    scale.add_argument("--admin", type=host_port("--admin"), default="127.0.0.1:50052",
                       help="the launcher's admin address (its --admin-port)")
    scale.add_argument("--timeout", type=seconds("--timeout", allow_zero=False), default=900.0,
                       help="seconds to wait for new workers to load and old ones to drain")

    inf = command("info", "model and worker status of a running cluster")
    _add_client_flags(inf)
    inf.add_argument("--timeout", type=seconds("--timeout", allow_zero=False), default=10.0,
                     help="deadline in seconds")

    # Listed here for `pdserve --help`; main() hands its arguments to bench.serving.run untouched.
    sub.add_parser("bench", add_help=False,
                   help="load a running cluster over gRPC: latency percentiles, throughput, goodput "
                        "(`pdserve bench --help`)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Like parse_args, but an unknown flag is reported with the subcommand's usage, not the top level's."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def _cmd_scale(args: argparse.Namespace) -> int:
    from deploy.scaling import request_scale

    if args.prefill is None and args.decode is None:
        raise UsageError("give --prefill N and/or --decode M")
    try:
        reply = request_scale(args.admin, {"prefill": args.prefill, "decode": args.decode}, args.timeout)
    except OSError as e:
        raise UsageError(f"cannot reach the launcher at {args.admin} ({e}): is `pdserve up` running, "
                         "and is --admin its --admin-port?") from None
    if not reply.get("ok"):
        print(f"pdserve scale: error: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"prefill: {' '.join(reply['prefill'])}\ndecode: {' '.join(reply['decode'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # imported only when asked for: the harness is not part of serving
        from bench.serving.run import main as bench_main
        return bench_main(argv[1:])
    args = parse_args(argv)
    try:
        if args.command == "up":
            return cmd_up(args)
        if args.command == "scale":
            return _cmd_scale(args)
        from deploy import client
        from router.security import SecurityConfigError
        from router.validation import GenerateInput
        try:
            conn = client.Connection.from_flags(args)
        except SecurityConfigError as e:
            raise UsageError(str(e)) from None
        if args.command == "generate":
            if args.raw and args.system is not None:
                raise UsageError("--system is a chat message: it has no place in a --raw prompt")
            # The embedded model is an instruct model: unless --raw, the prompt goes as a user message.
            request = GenerateInput(text=args.prompt if args.raw else None,
                                    chat=None if args.raw else client.chat_messages(args.prompt, args.system),
                                    max_tokens=args.max_tokens, temperature=args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                    stop=tuple(args.stop), ignore_eos=args.ignore_eos)
            return client.generate(conn, request, args.json, args.timeout)
        return client.info(conn, args.timeout)
    except UsageError as e:
        args.command_parser.print_usage(sys.stderr)
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `pdserve info | head`: the reader left; quiet, as other tools are
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush raises again
        return 1


if __name__ == "__main__":
    sys.exit(main())

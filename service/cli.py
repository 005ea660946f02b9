"""The `chatloop` command."""

import argparse
import logging

from service.settings import get_settings


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app

    settings = get_settings()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"chatloop: serving on http://{host}:{port}/v1 (model 'chatloop')", flush=True)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chatloop", description="A chat assistant that learns from feedback.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="start the OpenAI-compatible API")
    p.add_argument("--host", help="bind address (default: CHATLOOP_HOST)")
    p.add_argument("--port", type=int, help="port (default: CHATLOOP_PORT)")
    p.set_defaults(func=serve)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()

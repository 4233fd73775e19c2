"""Command line: run the proxy, check a configuration, authorise, or demo.

Exit status: 0 after a clean shutdown, 2 for a configuration error, 1 for any other
failure to start. Errors are one line on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

from proxy import __version__, logs
from proxy import config as configuration
from proxy.app import ProxyServer
from proxy.config import Config, Listen, plural
from proxy.errors import ConfigError, ConfigFileError, StartupError
from proxy.listeners import CannotListen

log = logging.getLogger("proxy")

AUTHORIZE_STEPS = """\
Connects a seller's shop to a credential set with grant: refresh_token, in two steps:

  1. Run it without --code. It prints bol's authorize URL for the set; the seller opens
     it, logs in and approves. bol then redirects the browser to the set's redirect_uri
     with ?code=...&state=... added. Check that state is the one printed.
  2. Run it again with that code, written --code=CODE (a code may start with '-').
     The code is exchanged for a refresh token, which is written to the set's
     refresh_token_file (mode 0600). Codes are single-use and short-lived: a failed
     exchange needs a new authorisation from step 1.
"""
AUTHORIZE_EXAMPLE = """\
example:
  bol-proxy authorize partner-shop --config config.yaml
  bol-proxy authorize partner-shop --config config.yaml --code=CODE
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bol-proxy",
        description="Local reverse proxy for the bol.com Retailer API: tools send plain "
                    "requests, the proxy attaches a cached OAuth2 token.",
    )
    p.add_argument("--config", help="YAML configuration file (default: $BOL_PROXY_CONFIG; "
                                    "without either, BOL_CLIENT_ID/BOL_CLIENT_SECRET)")
    p.add_argument("--host", help="listen on this address (overrides listen.host)")
    p.add_argument("--port", type=int, help="listen on this port (overrides listen.port)")
    p.add_argument("--log-level", choices=logs.LEVELS, default="info")
    p.add_argument("--log-format", choices=logs.FORMATS, default="text")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration, print a summary (secrets masked), exit")
    p.add_argument("--version", action="version", version=f"bol-proxy {__version__}")
    # The logging options are accepted after a command too (bol-proxy demo --log-format
    # json); there they only override what was given before it.
    logging_options = argparse.ArgumentParser(add_help=False)
    logging_options.add_argument("--log-level", choices=logs.LEVELS, default=argparse.SUPPRESS)
    logging_options.add_argument("--log-format", choices=logs.FORMATS,
                                 default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="{demo,authorize}")
    demo = sub.add_parser("demo", parents=[logging_options],
                          help="run against a built-in imitation of bol.com",
                          description="Run the proxy in front of a built-in imitation of "
                                      "login.bol.com and api.bol.com: no credentials and no "
                                      "network needed. It stays in the foreground and prints "
                                      "what to try; Ctrl-C stops it.")
    demo.add_argument("--port", type=int, dest="demo_port", metavar="PORT",
                      help="port of the demo proxy (default: 8080)")
    demo.add_argument("--bol-port", type=int, metavar="PORT", default=0,
                      help="port of the imitation of bol.com (default: any free port)")
    auth = sub.add_parser("authorize", parents=[logging_options],
                          help="connect a seller's shop to a refresh-token set",
                          description=AUTHORIZE_STEPS, epilog=AUTHORIZE_EXAMPLE,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    auth.add_argument("set", help="name of a credential set with grant: refresh_token")
    auth.add_argument("--config", dest="auth_config", metavar="CONFIG",
                      help="YAML configuration file (default: $BOL_PROXY_CONFIG)")
    auth.add_argument("--code", metavar="CODE",
                      help="step 2: the code from bol's redirect, to exchange; write "
                           "--code=CODE")
    return p


def config_loader(args: argparse.Namespace) -> Callable[[], Config]:
    """Loads the configuration as the command line says; used at start and on SIGHUP."""
    path = args.config or os.environ.get("BOL_PROXY_CONFIG") or None
    if args.port is not None and not 0 <= args.port <= 65535:
        # Validated like listen.port; unchecked, bind() fails with a traceback.
        raise ConfigError(f"--port: must be between 0 and 65535, got {args.port}")

    loads = 0

    def load() -> Config:
        nonlocal loads
        loads += 1
        config = configuration.load(path)
        if args.host or args.port is not None:
            listen = Listen(args.host or config.listen.host,
                            config.listen.port if args.port is None else args.port)
            if loads > 1 and listen != config.listen:
                # A reload: an edited listen in the file would otherwise seem ignored.
                log.info("--host/--port still override listen of %s (%s:%d there)",
                         config.source, config.listen.host, config.listen.port)
            configuration.check_ports(listen, config.credentials)
            config = replace(config, listen=listen)
        return config

    return load


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    try:
        if args.command == "demo":
            from proxy.demo import run_demo

            port = args.demo_port if args.demo_port is not None else args.port
            return run_demo(8080 if port is None else port, args.bol_port)
        if args.command == "authorize":
            from proxy.authorize import authorize

            args.config = args.auth_config or args.config
            return authorize(config_loader(args)(), args.set, args.code)
        load = config_loader(args)
        config = load()
        if not args.check:
            for warning in configuration.warnings(config):
                log.warning("%s", warning)
        if args.check:
            try:
                for line in configuration.summary(config):
                    print(line)
                sys.stdout.flush()
            except BrokenPipeError:  # --check | head: the reader has what it wanted
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(config, load))
    except ConfigError as exc:
        _fail(args.log_format, str(exc))
        return 1 if isinstance(exc, ConfigFileError) else 2
    except StartupError as exc:
        _fail(args.log_format, str(exc))
        return 1
    except KeyboardInterrupt:
        return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when the ``fast`` extra is installed (about 10 % more
    requests a second here), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _fail(log_format: str, message: str) -> None:
    """One line on stderr: plain, or a JSON object like every other line in json mode."""
    if log_format == "json":
        log.error("%s", message)
    else:
        print(f"bol-proxy: {message}", file=sys.stderr)


async def serve(config: Config, load: Callable[[], Config]) -> int:
    """Run until SIGTERM or SIGINT; reload on SIGHUP."""
    server = ProxyServer(config)
    try:
        await server.start()
    except OSError as exc:  # CannotListen names the port and whose it is
        raise StartupError(str(exc) if isinstance(exc, CannotListen) else
                           f"cannot start: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: asyncio.Queue[None] = asyncio.Queue()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reloads.put_nowait, None)
    # What start-up built (configuration, sets, modules) lives as long as the process:
    # keep it out of every later full garbage collection, whose pauses are latency.
    gc.collect()
    gc.freeze()
    log.info("bol-proxy listening on %s (%s, default: %s; %s)",
             ", ".join(server.listeners.addresses()),
             plural(len(config.credentials), "credential set"),
             config.default_credentials or "none",
             type(asyncio.get_running_loop()).__module__)
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(_reload_on_signal(server, reloads, load))
        await stop.wait()
        log.info("shutting down: finishing in-flight requests (at most %g s)",
                 server.config.shutdown_timeout)  # as reloaded, if it was
        watcher.cancel()
    await server.stop()
    log.info("stopped")
    return 0


async def _reload_on_signal(server: ProxyServer, reloads: asyncio.Queue[None],
                            load: Callable[[], Config]) -> None:
    while True:
        await reloads.get()
        try:
            await server.reload(load())
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        except Exception:
            log.exception("reload failed, keeping the running configuration")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

"""The popo_lite web panel (`popo-panel`, `python app.py`): launch, watch, inspect rollouts, evaluate.

Serves on 127.0.0.1 only unless told otherwise: the panel starts processes and reads files, so
exposing it (`--host 0.0.0.0`, `--share`) is opt-in, and then basic auth (`--auth USER:PASSWORD` or the
POPO_PANEL_AUTH variable, which keeps the password out of the process list) is strongly advised.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# A clone's recipes, beside the package; an installed package has none there.
REPOSITORY_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def default_configs_dir() -> Path:
    """./configs when the working directory has one, else the clone's configs/, else ./configs (absent:
    the panel opens with no recipe to pick and the YAML editor)."""
    here = Path("configs")
    if not here.is_dir() and REPOSITORY_CONFIGS.is_dir():
        return REPOSITORY_CONFIGS
    return here


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="Address to bind (default: localhost only).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    parser.add_argument(
        "--runs-dir", default="runs", help="Folder of run directories (the trainer's output_dir)."
    )
    parser.add_argument(
        "--configs-dir",
        default=str(default_configs_dir()),
        help="YAML recipes offered at launch (default: ./configs if it exists, else the clone's configs/).",
    )
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (opt-in).")
    parser.add_argument("--auth", help="USER:PASSWORD for basic auth (or set POPO_PANEL_AUTH).")
    parser.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="A folder (repeatable) whose files a config from the browser may name (model, dataset, "
        "eval_benchmarks, gguf_file), besides the runs and configs folders; symlinks are followed.",
    )
    parser.add_argument(
        "--allow-remote-code",
        action="store_true",
        help="Let a config from the browser set trust_remote_code: true (refused otherwise).",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    auth_text = args.auth or os.environ.get("POPO_PANEL_AUTH")
    auth = None
    if auth_text:
        user, separator, password = auth_text.partition(":")
        if not separator or not user or not password:
            print("error: --auth must be USER:PASSWORD", file=sys.stderr)
            return 2
        auth = (user, password)
    for folder in args.allow_path:
        if not Path(folder).expanduser().is_dir():
            print(f"error: --allow-path {folder}: not a folder", file=sys.stderr)
            return 2
    if (args.share or args.host not in ("127.0.0.1", "localhost", "::1")) and auth is None:
        print("warning: the panel is reachable beyond this machine without --auth", file=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:  # gradio's import takes seconds: after the arguments
        from popo_lite.panel.ui import CSS, build_panel
    except ModuleNotFoundError as error:
        if error.name != "gradio":
            raise
        print(
            "error: the panel needs gradio: pip install 'popo_lite[ui]' (or pip install gradio)",
            file=sys.stderr,
        )
        return 1

    build_panel(args.runs_dir, args.configs_dir, args.allow_path, args.allow_remote_code).launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        css=CSS,
        show_error=True,
        run_history=False,  # it would log every 2-second refresh in the browser
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

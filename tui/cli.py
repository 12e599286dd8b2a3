"""``workbench tui``: the Textual app on a run file (browse), on a live model (``--live``), or
served to a web browser (``--serve``, textual-serve). Registered by :mod:`workbench.cli`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from workbench.errors import WorkbenchError


def serve_command(run_path: Path | None, keys: Path | None, live_options: dict[str, object] | None) -> str:
    """The shell command textual-serve runs for each browser connection: the same ``workbench tui``
    (a run file, or ``--live`` with its options) under this Python, paths made absolute."""
    args = [sys.executable, "-m", "workbench", "tui"]
    if run_path is not None:
        args.append(str(Path(run_path).resolve()))
    if keys is not None:
        args += ["--keys", str(Path(keys).resolve())]
    if live_options is not None:
        args.append("--live")
        for name, value in live_options.items():
            if value is not None:
                args += [f"--{name}", str(Path(value).resolve()) if isinstance(value, Path) else str(value)]
    return shlex.join(args)


def browsed_run(path: Path) -> Path:
    """The run file ``workbench tui PATH`` opens: ``PATH``, checked (a missing, foreign or truncated
    file is one clear line here, not in the app); for an activation cache (``workbench export``),
    the run it records when that file is there (said on stderr), else one line naming the command."""
    from workbench.cache.file import is_cache_file, recorded_run
    from workbench.store.reader import RunFile

    if Path(path).is_file() and is_cache_file(path):
        recorded, found = recorded_run(path)
        if found is None:
            hint = (f"its run {recorded} is not there: open the run with  workbench tui RUN.h5" if recorded else
                    "it records no run (save_activation_cache)")
            raise WorkbenchError(f"{path} is an activation cache (workbench export), not a run file; {hint}; "
                                 f"workbench info {path} shows what the cache holds")
        print(f"{path} is an activation cache (workbench export): opening its run {found}", file=sys.stderr, flush=True)
        path = found
    RunFile(path).close()
    return path


def tui(
    run_path: Optional[Path] = typer.Argument(None, help="A run file to browse (written by `workbench run`)."),
    live: bool = typer.Option(False, "--live", help="Step rounds live with a loaded model instead of browsing a file."),
    model: str = typer.Option("organism", help="--live: Hugging Face hub name, local model folder, or 'organism'."),
    protocol: Optional[str] = typer.Option(None, help="--live: protocol name or .toml path (default: organism for the organism, else bbq-paper)."),
    task: Optional[str] = typer.Option(None, help="--live: organism, bbq or prompts (default: organism for the organism, else bbq)."),
    data: Optional[Path] = typer.Option(None, help="--live: a BBQ or prompts JSONL file to draw items from."),
    probe: Optional[Path] = typer.Option(None, help="--live: a probe file (workbench probe fit) whose concept score is shown per round. Default: the first probe of the same model in artifacts/probes/ (organism-fair.h5, which make demo fits, first); the header names it."),
    device: str = typer.Option("auto", help="--live: auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="--live: model dtype: auto, float32, bfloat16, float16."),
    adapter: Optional[Path] = typer.Option(None, metavar="DIR", help="--live: a LoRA adapter (e.g. from `workbench finetune`) merged into the model after it loads."),
    keys: Optional[Path] = typer.Option(None, "--keys", help="A TOML keymap (default: ~/.config/workbench/keys.toml when it exists)."),
    serve: bool = typer.Option(False, "--serve", help="Serve the app to a web browser (textual-serve) instead of this terminal."),
    host: str = typer.Option("localhost", help="--serve: the address to listen on (a loopback address unless --allow-remote)."),
    port: int = typer.Option(8000, help="--serve: the port to listen on (1–65535)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="--serve: allow a --host other machines can reach (plain HTTP: the URL's token crosses the network; prefer ssh -L)."),
    max_sessions: int = typer.Option(4, "--max-sessions", help="--serve: the most browser sessions (app processes) at once."),
) -> None:
    """Look at a run in the terminal: step samples and rounds, watch entropy and concept scores (browse a RUN file), or step rounds live with a model (--live).

    Keys: n/p next/previous round, j/k next/previous sample, r the run's per-round curves, ? every key. --serve opens the same app in a web browser at the URL it prints, which holds a random token (nothing is served without it); for a remote GPU box: ssh -L 8000:localhost:8000, then open that URL.
    """
    from tui.keymap import load_keymap

    if serve:
        from tui.serve import check_serve_options

        check_serve_options("", host, port, allow_remote, max_sessions)  # before anything loads
    if live and run_path is not None:
        raise WorkbenchError("give a RUN file to browse, or --live, not both")
    if not live and run_path is None:
        raise WorkbenchError("give a RUN file to browse (e.g. artifacts/runs/demo.h5), or --live")
    keymap = load_keymap(keys)
    live_config = None
    if live:
        from tui.live import LiveConfig

        live_config = LiveConfig.from_options(model=model, protocol=protocol, task=task, data=data, probe=probe,
                                              device=device, dtype=dtype, adapter=adapter)
    else:
        run_path = browsed_run(run_path)
    if serve:
        from tui.serve import check_serve_options, serve as serve_guarded

        options = dict(model=model, protocol=protocol, task=task, data=data, probe=probe, device=device, dtype=dtype)
        command = serve_command(run_path, keys, options if live else None)
        serve_guarded(check_serve_options(command, host, port, allow_remote, max_sessions))
        return
    from tui.app import WorkbenchApp

    WorkbenchApp(run_path=run_path, live=live_config, keymap=keymap).run()

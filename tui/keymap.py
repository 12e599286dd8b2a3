"""Every key binding of the TUI, each with an id, and the TOML file that remaps them.

A keymap file maps binding ids to comma-separated Textual key names::

    # ~/.config/workbench/keys.toml  (or: workbench tui RUN.h5 --keys my-keys.toml)
    [keys]
    "round.next" = "n,space"
    "sample.next" = "j,down"

Key names are Textual's: letters, ``G`` (shift+g), ``slash``, ``question_mark``,
``left_square_bracket``, ``ctrl+n``, ``f5`` … Bindings show in the footer, the command palette
(ctrl+p) and the help screen (``?``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from textual.binding import Binding

from workbench.errors import WorkbenchError

# the sample screen (browse mode): stepping rounds, samples, layers
SAMPLE_BINDINGS = [
    Binding("n,right_square_bracket", "next_round", "next round", id="round.next", key_display="n"),
    Binding("p,left_square_bracket", "previous_round", "previous round", id="round.previous", key_display="p", show=False),
    Binding("g", "first_round", "first round", id="round.first", show=False),
    Binding("G", "last_round", "last round", id="round.last", show=False),
    Binding("j", "next_sample", "next sample", id="sample.next"),
    Binding("k", "previous_sample", "previous sample", id="sample.previous", show=False),
    Binding("l", "next_layer", "next layer", id="layer.next", show=False),
    Binding("h", "previous_layer", "previous layer", id="layer.previous", show=False),
    Binding("c", "choose_probe", "choose probe", id="probe.choose", show=False),
    Binding("v", "toggle_score", "cosine/projection", id="score.toggle", show=False),
    Binding("t", "toggle_colours", "colours", id="tokens.toggle"),
    Binding("slash", "filter", "filter", id="filter", key_display="/"),
    Binding("r", "show_run", "run", id="screen.run"),
]

# the run screen: the per-round curves and table
RUN_BINDINGS = [
    Binding("r,escape", "app.pop_screen", "samples", id="screen.samples", key_display="r"),
    Binding("n,right_square_bracket", "next_round", "next round", id="run.round.next", key_display="n"),
    Binding("p,left_square_bracket", "previous_round", "previous round", id="run.round.previous", key_display="p"),
    Binding("c", "choose_probe", "probe", id="run.probe.choose"),
]

# live mode: a loaded model, one round at a time
LIVE_BINDINGS = [
    Binding("n", "step", "next round", id="live.step"),
    Binding("i", "instruct", "instruction", id="live.instruct"),
    Binding("x", "inject", "immoral", id="live.inject"),
    Binding("o", "new_item", "item", id="live.item"),
    Binding("s", "save", "save", id="live.save"),
    Binding("right_square_bracket", "next_round", "next round", id="live.round.next", show=False),
    Binding("left_square_bracket", "previous_round", "previous round", id="live.round.previous", show=False),
    Binding("l", "next_layer", "next layer", id="live.layer.next", show=False),
    Binding("h", "previous_layer", "previous layer", id="live.layer.previous", show=False),
    Binding("t", "toggle_colours", "colours", id="live.tokens.toggle", show=False),
    Binding("a", "toggle_steer", "steer", id="live.steer"),
    Binding("plus", "alpha_up", "α up", id="live.alpha.up", key_display="+", show=False),
    Binding("minus", "alpha_down", "α down", id="live.alpha.down", key_display="-", show=False),
]

# everywhere
APP_BINDINGS = [
    Binding("question_mark", "help", "help", id="help", key_display="?"),
    Binding("q", "quit", "quit", id="quit"),
]

ALL_BINDINGS = SAMPLE_BINDINGS + RUN_BINDINGS + LIVE_BINDINGS + APP_BINDINGS
BINDING_IDS = {b.id for b in ALL_BINDINGS}


def default_keymap_path() -> Path:
    """``$XDG_CONFIG_HOME/workbench/keys.toml`` (``~/.config/workbench/keys.toml``)."""
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "workbench" / "keys.toml"


MODIFIERS = ("ctrl", "alt", "shift", "super", "meta", "hyper")


def is_key(key: str) -> bool:
    """Whether ``key`` names a key Textual can bind: modifiers (each once) ``+`` a printable character,
    a key name (``space``, ``escape``, ``pageup``, ``f5``) or a character's Unicode name in lower case
    with underscores (``question_mark``, ``right_square_bracket``)."""
    import unicodedata

    from textual.keys import REPLACED_KEYS, Keys

    *mods, base = key.split("+")
    base = REPLACED_KEYS.get(base, base)  # slash → solidus …
    if any(m not in MODIFIERS for m in mods) or len(set(mods)) != len(mods) or not base:
        return False
    if len(base) == 1:
        return base.isprintable() and not base.isspace()
    if base in {k.value for k in Keys} and not base.startswith("<"):
        return True
    try:
        unicodedata.lookup(base.upper().replace("_", " "))
    except KeyError:
        return False
    return True


def load_keymap(path: Path | None = None) -> dict[str, str]:
    """Binding id → keys from a TOML keymap file (see the module docstring).

    ``path=None`` reads :func:`default_keymap_path` when it exists, else returns ``{}``. A missing
    explicit file, bad TOML, an unknown binding id or a non-string value is a WorkbenchError.
    """
    if path is None:
        path = default_keymap_path()
        if not path.is_file():
            return {}
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"keymap file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise WorkbenchError(f"{path}: not valid TOML ({e})") from None
    keys = data.get("keys", {})
    if not isinstance(keys, dict) or set(data) - {"keys"}:
        raise WorkbenchError(f"{path}: expected one [keys] table of binding id = \"key,key\"")
    for binding_id, value in keys.items():
        if binding_id not in BINDING_IDS:
            raise WorkbenchError(f"{path}: unknown binding id {binding_id!r} (known: {', '.join(sorted(BINDING_IDS))})")
        if not isinstance(value, str) or not value.strip():
            raise WorkbenchError(f"{path}: {binding_id} must be a string of comma-separated keys, e.g. \"n,space\"")
        for key in (part.strip() for part in value.split(",")):
            if not is_key(key):
                raise WorkbenchError(f"{path}: {binding_id}: {key!r} is not a key Textual knows (a character, a name such as "
                                     "space, escape, up, f5, question_mark, with modifiers ctrl+, alt+, shift+)")
    return {k: ",".join(part.strip() for part in v.split(",")) for k, v in keys.items()}

"""``workbench export``: every token's activations for chosen hooks, recomputed from a run's final transcripts.

The model is causal, so one forward pass over a sample's final transcript holds every round's
tokens exactly as each round saw them (DESIGN §3); the export makes that one pass per batch.
Hooks are picked by glob patterns over the TransformerBridge's hook names. Hooks at a Hugging
Face module boundary (``hook_resid_post``, ``hook_attn_out``, …; see :mod:`workbench.engine.capture`) are
read from the plain HF model's own pass; as soon as one chosen hook lives inside a module
(``attn.hook_pattern``, ``attn.hook_z``, …) the batch goes through the bridge instead, once, for all
of them. Inside the hooks only the chosen tokens are kept, cast and moved to the CPU at once, so
memory is one batch of chosen tokens.

Writing (docs/CACHE.md, :mod:`workbench.cache.writer`): the token count is known before the first
forward (the run holds every final transcript), so the cache file is created up front in
``OUT.parts/`` with its token labels and metadata written and every activation dataset allocated;
each batch's rows are then written once, straight into place. Progress is recorded after each batch
by an empty ``done-A-B.{boot}`` name, safe against the process dying (its writes are in the page
cache) but not trusted after the machine restarts; with ``fsync=True`` (``--fsync``) by an fsync,
then a durable ``done-A-B`` name, at most once a second. ``--resume`` computes only the unfinished
batches (batches are fixed by sample order: the result is bit-identical to an uninterrupted
export). At the end the file is renamed onto ``OUT`` (fsynced first with ``fsync=True``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import typer

from workbench.cache.file import ROLES, HookLayout, create_cache_file, is_attention_map
from workbench.store.durability import atomic_replace, fsync_path
from workbench.store.reader import decoded_attrs
from workbench.store.trust import refuse_symlinks, refuse_symlinks_in
from workbench.cache.writer import PartialCache, done_batches, is_durable
from workbench.engine.images import image_inputs
from workbench.errors import WorkbenchError, parse_int_list
from workbench.cache.plan import ExportPlan, check_same_model, export_dtype, parse_rows, plan_export, read_run, recorded_adapter, run_images, token_table
from workbench.cache.size import bytes_under, check_size, estimate_bytes, human_bytes, parse_size
from workbench.cache.vision import patch_table, plan_vision_export, vision_activations, vision_patches
from workbench.cache.hooks import BLOCK_HOOK, available_hooks, drop_aliases, hf_sites, hook_aliases, is_vision_hook, resolve_hooks, torch_dtype


FORMATS = ("hdf5", "saelens")


def batch_activations(
    model: Any,
    transcripts: list[np.ndarray],
    chosen: list[np.ndarray],
    hooks: list[str],
    sites: dict[str, Any] | None,
    dtype: str,
    key_length: int,
    images: list[Any] | None = None,
) -> dict[str, np.ndarray]:
    """One forward pass over right-padded transcripts; each hook's value at the chosen positions.

    transcripts ``[B][len_i]``, chosen ``[B][n_i]`` positions → ``{hook: [Σ n_i, *per_token]}`` in
    ``dtype``, samples in order; attention maps ``[Σ n_i, n_heads, key_length]``, zero past each
    sample's own length. ``sites`` (from :func:`hf_sites`): read from the HF model's own pass.
    ``images`` (a VLM run: one picture per transcript) go in as pixel values (:func:`image_inputs`)."""
    import torch

    from workbench.engine.generation import pad

    device = model.device
    ids, _ = pad([t.tolist() for t in transcripts], model.tokenizer.pad_token_id, device, "right")
    b_idx = torch.from_numpy(np.repeat(np.arange(len(chosen)), [len(c) for c in chosen])).to(device)
    p_idx = torch.from_numpy(np.concatenate(chosen).astype(np.int64)).to(device)
    out_dtype = torch_dtype(dtype)
    got: dict[str, np.ndarray] = {}
    pixels = image_inputs(model, images, ids) if images is not None else {}

    def keep(name: str, act: torch.Tensor) -> None:
        if is_attention_map(name):  # [batch, head, q, k] → [tokens, head, key_length]
            rows = act.transpose(1, 2)[b_idx, p_idx]
            rows = torch.nn.functional.pad(rows, (0, key_length - rows.shape[-1]))
        else:
            rows = act[b_idx, p_idx]
        got[name] = rows.to(out_dtype).cpu().numpy()

    with torch.no_grad():
        if sites is not None:
            handles = []
            try:
                for name, site in sites.items():
                    module = model.hf.get_submodule(site.module)
                    if site.side == "input":
                        hook = functools.partial(lambda n, mod, args, kwargs: keep(n, args[0] if args else kwargs["hidden_states"]), name)
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        hook = functools.partial(lambda n, mod, args, output: keep(n, output[0] if isinstance(output, tuple) else output), name)
                        handles.append(module.register_forward_hook(hook))
                model.hf(input_ids=ids, logits_to_keep=1, use_cache=False, **pixels)  # no KV cache to fill: one pass
            finally:
                for h in handles:
                    h.remove()
        else:
            layers = [BLOCK_HOOK.match(n) for n in hooks]
            stop = max(int(m.group(1)) for m in layers) + 1 if all(layers) else None
            fwd = [(name, functools.partial(lambda n, act, hook: keep(n, act), name)) for name in hooks]
            with model.bridge.hooks(fwd_hooks=fwd):
                if pixels:
                    model.bridge(ids, return_type=None, **pixels)
                else:
                    model.bridge(ids, return_type=None, stop_at_layer=stop)
    return got


# --------------------------------------------------------------------------- the parts folder


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk is full, the quota is, or one file may not grow


def _refused_write(e: BaseException) -> int | None:
    """The errno of a write the file system refused for lack of room (``_REFUSED``); None for any other error."""
    from workbench.store.durability import os_errno

    code = os_errno(e)
    if code is None and "No space left" in str(e):
        code = errno.ENOSPC
    return code if code in _REFUSED else None


@contextlib.contextmanager
def _disk_full_is_one_line(where: Path, plan: ExportPlan | None, parts: Path) -> Iterator[None]:
    """A write the file system refuses (full disk, full quota, a file-size limit) becomes one line
    that says what is kept and what to do (h5py's tracebacks as it frees the failed file's objects
    dropped); other errors pass."""
    from workbench.store.failed_writes import quiet_failed_writes

    try:
        with quiet_failed_writes():
            yield
    except (OSError, RuntimeError) as e:  # h5py reports a failed write as either
        code = _refused_write(e)
        if code is None:
            raise
        from workbench.store.durability import free_space
        from workbench.store.failed_writes import skip_hdf5_teardown

        skip_hdf5_teardown()  # HDF5 may hold a dataset it could not close
        kept = len(done_batches(parts)) if parts.exists() else 0
        total = plan.n_batches if plan else "?"
        kept_text = f"{kept} of {total} batches are kept in {parts}"
        if code == errno.EFBIG:
            raise WorkbenchError(
                f"writing {where} failed: {os.strerror(code)} (the file system, or a `ulimit -f`, refuses one file "
                f"this large; the cache file is allocated at its full size); {kept_text}; lift the limit and run the "
                "same command with --resume, or export fewer hooks, rounds or samples (see --help)") from None
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        raise WorkbenchError(f"{what} writing {where} ({free_space(where)} free there): {kept_text}; "
                             "free some space and run the same command with --resume") from None


def export_run(
    run_path: str | Path,
    out: str | Path,
    hooks: list[str],
    model: Any = None,
    rows: list[int] | None = None,
    rounds: list[int] | None = None,
    roles: tuple[str, ...] = ROLES[:3],
    dtype: str = "auto",
    batch_size: int = 16,
    format: str = "hdf5",
    context_size: int = 128,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    fsync: bool = False,
    max_size: int | None = None,
    on_estimate: Callable[[str], None] | None = None,
) -> Path:
    """Export every chosen token's activations of a run into ``out``; returns ``out``.

    ``hooks`` are glob patterns over the bridge's hook names; ``rows`` run-file rows (default: every
    finished sample); ``rounds`` 0-based (default all); ``roles`` among prompt/response/template.
    ``model``: a loaded model or a name to load (default: the run's own; it must be the run's model). ``format``: ``hdf5`` (docs/CACHE.md) or
    ``saelens`` (a Hugging Face ``datasets`` folder, :mod:`workbench.cache.saelens`).
    ``on_batch(done_tokens, total_tokens)`` is called once before the first batch and after each.
    ``fsync``: durable against a power cut (fsynced commits at most once a second, ``out`` fsynced
    before its rename); by default safe against the process dying only, with no fsync (docs/CACHE.md).
    Before anything is written, the size is estimated (:func:`estimate_bytes`, told to
    ``on_estimate`` as one line) and an export larger than ``max_size`` bytes or the free space is
    refused (:func:`check_size`)."""
    from workbench.engine.models import load_model

    run_path, out = Path(run_path), Path(out)
    if not hooks:
        resolve_hooks([], {})  # the one-line "--hooks is required", before a model is loaded
    if format not in FORMATS:
        raise WorkbenchError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "saelens":
        from workbench.cache.saelens import check_saelens_ready

        check_saelens_ready(context_size)
    parts = _parts_dir(out)
    refuse_symlinks(out)
    refuse_symlinks_in(parts)
    if resume and overwrite:
        raise WorkbenchError("--resume and --overwrite exclude each other (--resume continues OUT.parts, --overwrite starts over)")
    if out.resolve() == run_path.resolve() or (out.exists() and run_path.exists() and os.path.samefile(out, run_path)):
        raise WorkbenchError(f"--out {out} is the run being exported: give the cache another path")
    if out.exists() and not overwrite:
        raise WorkbenchError(f"{out} already exists (use --overwrite to replace it)")
    if parts.exists() and not (resume or overwrite):
        raise WorkbenchError(f"{parts} holds an interrupted export: continue it with --resume, or start over with --overwrite")
    run = read_run(run_path)
    if not len(run.rows):
        raise WorkbenchError(f"{run_path} has no finished samples to export")
    meta = run.meta
    if model is None or isinstance(model, str):
        from workbench.engine.adapter import apply_adapter, check_adapter

        adapter = recorded_adapter(meta)
        if adapter is not None:
            check_adapter(adapter, option="the run's adapter")
        model = load_model(model or str(meta.get("model_name", "organism")), device=device,
                           dtype=str(meta.get("model_dtype", "auto")), revision=meta.get("model_revision") or None)
        model = apply_adapter(model, adapter)
    check_same_model(model, meta, run_path)
    shapes = available_hooks(model)
    names, merged = drop_aliases(resolve_hooks(list(hooks), shapes), hook_aliases(model))
    if format == "saelens":
        from workbench.cache.saelens import check_saelens_hooks

        check_saelens_hooks(names)
    vision = [n for n in names if is_vision_hook(n)]
    n_rows = 0
    if vision:
        if len(vision) != len(names):
            raise WorkbenchError(f"{vision[0]} is a vision hook (rows: image patches) and {next(n for n in names if n not in vision)} "
                                 "a language-model hook (rows: transcript tokens): export them separately")
        from workbench.engine.models import vision_family

        if vision_family(model.hf.config) == "LLaVA-NeXT":
            raise WorkbenchError(f"{vision[0]}: LLaVA-NeXT's tower sees each picture as a varying number of tiles; "
                                 "its vision hooks are not exported yet (its language-model hooks are, --roles image included)")
        per_image = vision_patches(model, vision)
        if len(set(per_image.values())) > 1:
            (a, na), (b, nb) = sorted(per_image.items(), key=lambda kv: kv[1])[0], sorted(per_image.items(), key=lambda kv: kv[1])[-1]
            raise WorkbenchError(f"{a} has {na} rows per image and {b} {nb} (the tower's patches and CLS, the projector's "
                                 "image tokens): export them separately")
        n_rows = next(iter(per_image.values()))
        plan, chosen = plan_vision_export(run, run_path, names, rows, rounds, list(roles), export_dtype(dtype, model.dtype),
                                          batch_size, n_rows)
    else:
        plan, chosen = plan_export(run, run_path, names, rows, rounds, list(roles), export_dtype(dtype, model.dtype), batch_size)
    pictures = run_images(run, plan.rows)  # checked before anything is written
    layouts = [HookLayout(name, (shapes[name][0], plan.key_length) if is_attention_map(name) else shapes[name], plan.dtype)
               for name in names]
    n_tokens = int(sum(len(c) for c in chosen))
    estimate = estimate_bytes(n_tokens, layouts)
    if on_estimate:
        on_estimate(f"exporting about {human_bytes(estimate)}: {len(plan.rows)} samples, {n_tokens:,} tokens, "
                    f"{len(layouts)} hooks ({plan.dtype}) to {out}")
    check_size(estimate, out, parts, max_size, (bytes_under(out) if overwrite else 0) + (bytes_under(parts) if resume or overwrite else 0))
    manifest = {"plan": asdict(plan), "model": model.metadata()}
    manifest["plan"].pop("run_file")
    durable = is_durable(fsync)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)
    with _disk_full_is_one_line(parts, plan, parts):
        _start_or_check_parts(parts, manifest, durable)
    tokens = patch_table(plan, n_rows) if vision else token_table(run, plan, chosen, model.tokenizer)
    attrs = _cache_attrs(meta, model, plan)
    if merged:
        attrs["hook_aliases"] = merged

    def create(path: Path) -> list:
        return create_cache_file(path, attrs, tokens, layouts, samples=np.asarray(plan.rows),
                                 sample_index=np.asarray(plan.sample_index), status="running")

    sites = None if vision else hf_sites(model, names)
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    total = tokens.n_tokens
    with _disk_full_is_one_line(parts, plan, parts), PartialCache.open(parts, plan.batch_tokens, create, durable=durable) as cache:
        if on_batch:
            on_batch(cache.done_tokens, total)
        for k in cache.missing:
            batch_rows = plan.batch_rows(k)
            first = k * plan.batch_size
            if vision:
                arrays = vision_activations(model, pictures[first : first + len(batch_rows)], names, plan.dtype, n_rows)
            else:
                arrays = batch_activations(model, [run.transcripts[position_of_row[r]] for r in batch_rows],
                                           chosen[first : first + len(batch_rows)], names, sites, plan.dtype, plan.key_length,
                                           None if pictures is None else pictures[first : first + len(batch_rows)])
            cache.write(k, arrays)
            if on_batch:
                on_batch(cache.written_tokens, total)
        if format == "saelens":
            from workbench.cache.saelens import write_saelens

            cache.commit()
            write_saelens(out, attrs, tokens, layouts, cache.blocks(), context_size, fsync=durable)
        else:
            cache.finish(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def finished_export(out: Path) -> bool:
    """Whether ``out`` is a complete cache file that the interrupted export in ``OUT.parts`` (if any)
    was writing: the same run digest and hooks (an export killed after its final rename leaves
    both). Reads attributes only."""
    from workbench.cache.file import is_cache_file, open_cache_file

    if not is_cache_file(out):
        return False
    try:
        with open_cache_file(out) as f:
            attrs = decoded_attrs(f.attrs)
    except WorkbenchError:
        return False
    try:
        plan = json.loads((_parts_dir(out) / "manifest.json").read_text())["plan"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return plan.get("run_digest") == attrs.get("run_digest") and list(plan.get("hooks", [])) == list(attrs.get("hooks", []))


def _start_or_check_parts(parts: Path, manifest: dict[str, Any], fsync: bool) -> None:
    """Create ``parts`` with its manifest, or check that an interrupted export's is this one's.
    A manifest that is missing or unreadable while no batch counts (a kill before it was in place,
    or a restart after it was written without fsync) is written anew."""
    path = parts / "manifest.json"
    if parts.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError):
            have = None
        if have is not None or done_batches(parts):
            if have != json.loads(json.dumps(manifest)):
                raise WorkbenchError(f"--resume: {parts} was started with other settings (run, hooks, selection, dtype, batch size or model)")
            if fsync:
                fsync_path(path)  # it may have been written without: the durable commits rely on it
            return
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    if fsync:
        atomic_replace(tmp, path)
    else:
        tmp.replace(path)


def _cache_attrs(meta: dict[str, Any], model: Any, plan: ExportPlan) -> dict[str, Any]:
    from workbench.version import __version__

    attrs: dict[str, Any] = {"source": "workbench export", "workbench_version": __version__, **model.metadata()}
    attrs.update({
        "activation_dtype": plan.dtype,
        "run_file": plan.run_file,
        "run_digest": plan.run_digest,
        "run_model_dtype": str(meta.get("model_dtype", "")),
        "n_rounds": int(meta.get("n_rounds", 0)),
        "selection": {"rounds": plan.rounds, "roles": plan.roles},  # the rows are samples/sample
        "batch_size": plan.batch_size,
        "key_length": plan.key_length,
    })
    if model.dtype != plan.dtype:
        exact = model.dtype in ("bfloat16", "float16") and plan.dtype == "float32"
        attrs["dtype_note"] = (f"the model computes in {model.dtype}; activations are stored as {plan.dtype} "
                               f"({'exactly' if exact else 'rounded'}; HDF5 has no bfloat16)")
    return attrs


# --------------------------------------------------------------------------- the command




def export_command(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`."),
    hooks: list[str] = typer.Option([], "--hooks", metavar="PATTERN", help="Hook names or glob patterns over the TransformerBridge's hooks, e.g. 'blocks.*.hook_resid_post', 'blocks.3.attn.hook_z', 'blocks.*.attn.hook_pattern' (repeatable; commas also separate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache file to write (HDF5), or a folder for --format saelens. Default: beside the run, RUN-cache.h5."),
    rounds: Optional[str] = typer.Option(None, help="Comma-separated rounds to keep, 1-based (default: all)."),
    samples: Optional[str] = typer.Option(None, help="Run-file rows to keep: A:B or A,B,C (default: every finished sample)."),
    roles: str = typer.Option("prompt,response,template", help="Token roles to keep: prompt (user turn, assistant header and prefix), response (generated), template (the closing text); a vision-language model's run also image (the image tokens, otherwise part of round 1's prompt)."),
    dtype: str = typer.Option("auto", help="Stored dtype: auto (the model's; float32 for bfloat16), float32 or float16."),
    format: str = typer.Option("hdf5", "--format", help="hdf5 (docs/CACHE.md) or saelens (a datasets folder SAELens' ActivationsStore reads)."),
    context_size: int = typer.Option(128, help="--format saelens: tokens per window."),
    batch_size: int = typer.Option(16, help="Samples per forward pass."),
    model: Optional[str] = typer.Option(None, help="Model to load (default: the run's own); must be the run's model."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    resume: bool = typer.Option(False, help="Continue an interrupted export (its OUT.parts folder)."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT (and any interrupted export of it)."),
    fsync: bool = typer.Option(False, "--fsync/--no-fsync", help="--fsync: make the export durable against a power cut: fsync its progress at most once a second and OUT before it is renamed into place (the disk's speed then bounds the export). Without it the export, like numpy.save, is safe against the process dying (kill, Ctrl-C, a full disk: --resume continues it) but not against a power cut: an OUT finished less than about 30 s before one may be incomplete, and an interrupted export is recomputed from the start."),
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Refuse an export whose estimated size is larger, e.g. 10GiB or 500MB (the estimate is printed before anything is written; default: the free space where OUT goes)."),
    list_hooks: bool = typer.Option(False, "--list-hooks", help="Print the hook names the model has, with their per-token shapes (and which are legacy aliases of another), and exit. A vision-language model's vision tower and projector hooks (vision_encoder.*, vision_projector.*) are listed per image patch: export them on their own (--roles image), one row per patch."),
) -> None:
    """Export every token's activations for chosen hooks, recomputed from the run's final transcripts (one pass per batch)."""
    from workbench.store.reader import RunFile

    with RunFile(run_path) as run:
        meta = run.meta
        running, n_done = run.running, int(run.done.sum())
    if list_hooks:
        from workbench.engine.models import load_model

        loaded = load_model(model or str(meta.get("model_name", "organism")), device=device,
                            dtype=str(meta.get("model_dtype", "auto")), revision=meta.get("model_revision") or None)
        from workbench.engine.adapter import apply_adapter

        loaded = apply_adapter(loaded, recorded_adapter(meta))
        aliases = hook_aliases(loaded)
        for name, shape in available_hooks(loaded).items():
            alias = f"  (alias of {aliases[name]})" if name in aliases else ""
            where = "  (per image patch)" if is_vision_hook(name) else ""
            print(f"{name}  {list(shape) if not is_attention_map(name) else [shape[0], 'key_pos']}{alias}{where}")
        return
    patterns = [p.strip() for h in hooks for p in h.split(",") if p.strip()]
    out = out or run_path.with_name(run_path.stem + ("-saelens" if format == "saelens" else "-cache.h5"))
    if resume and not overwrite and out.exists() and finished_export(out):
        refuse_symlinks(_parts_dir(out))
        shutil.rmtree(_parts_dir(out), ignore_errors=True)
        print(f"{out} is complete already (the export finished before it was stopped): nothing left to do", file=sys.stderr)
        return
    if running:
        print(f"note: {run_path} is not finished (still running, or stopped before its end): exporting the {n_done} of "
              f"{meta.get('n_samples')} samples finished so far (export again once it has finished for the rest)", file=sys.stderr)
    wanted_rounds = parse_int_list(rounds, "--rounds")
    limit = None if max_size is None else parse_size(max_size)
    with export_progress() as reporter:
        export_run(run_path, out, patterns, model=model, rows=parse_rows(samples, int(meta.get("n_samples", 0))),
                   rounds=None if wanted_rounds is None else [r - 1 for r in wanted_rounds],
                   roles=tuple(r.strip() for r in roles.split(",") if r.strip()), dtype=dtype, batch_size=batch_size,
                   format=format, context_size=context_size, device=device, resume=resume, overwrite=overwrite,
                   on_batch=reporter.update, fsync=fsync, max_size=limit,
                   on_estimate=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {out}", file=sys.stderr)


def export_progress() -> Any:
    """The export's :class:`workbench.terminal.ProgressBar` over tokens; its ``update(done, total)``
    is :func:`export_run`'s ``on_batch``."""
    from workbench.terminal import ProgressBar

    return ProgressBar("exported", "tokens")

"""The run directory, its manifests, its lock, and the content hashes that decide whether a stage can be skipped.

Layout: ``<root>/<run name>/<stage>/`` holds one stage's adapter (PEFT format), head, ``metrics.jsonl``,
``config.yaml`` (the resolved config) and ``manifest.json``. The manifest is written last and atomically: a
directory without one is an unfinished run, which the next run of the same inputs resumes from its checkpoint.
``<run>/.lock`` is held (``flock``) by the run using the directory; see :func:`run_lock`.

The content hash of a stage (``Pipeline.inputs`` in :mod:`deltalign.pipeline.graph` lists the parts) covers:
its config and the model config, less the settings marked ``NOT_HASHED`` (threads, logging and checkpoint
cadence, gradient checkpointing); every file of the base model; the data it reads, by content
(:func:`data_fingerprint`); the source file of each user ``module:function`` reward in its ``rules``
(:func:`rules_fingerprint`); the global batch and the DeepSpeed / mixed-precision settings it was launched with
(:func:`launch_fingerprint`); the versions of deltalign, torch, transformers and peft (:func:`software_versions`);
the hashes of its upstream stages, and of the finished stages it reads when present (``Stage.hash_uses``).
It does not cover: deltalign's own code beyond its version (an edited checkout hashes as the release it
says it is); other packages (accelerate, datasets, deepspeed, CUDA/cuDNN) and the hardware; the files behind a
``datasets`` id (only the revision it resolves to in the local cache); the code a user reward imports from
other modules; environment variables other than those :func:`launch_fingerprint` names.

A finished stage whose hash matches is skipped. When the inputs changed, the old output is not overwritten: it is
moved to ``<run>/.history/<stage>-<old hash>/`` and the stage runs again (and so does everything downstream,
since their upstream hash changed).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import glob
import importlib.util
import json
import os
import shutil
import time
from importlib import metadata
from pathlib import Path

from deltalign.core import atomic, verify
from deltalign.core.fingerprints import sha256_file, sha256_json

MANIFEST = "manifest.json"
STARTED = "inputs.json"
LOCK = ".lock"
RESUME_ONLY = ("eval_base.json", "eval_before.json", "ref_logprobs-*.safetensors")
"""What a stage keeps only to resume faster (SFT's and the RM's baselines, DPO's reference cache): read by no
other stage, set aside and computed again by the stage itself; a finished stage is not run again for them."""
VERSIONED = ("deltalign", "torch", "transformers", "peft")  # packages whose version is part of every hash
def data_fingerprint(source: str) -> str:
    """Hash of a data source, by what a stage reads: a local file's or directory's bytes; for ``embedded:<name>``
    the bytes of the materialised file (regenerated first if the generator changed); for a `datasets` id, the
    revision it resolves to (:func:`datasets_revision`)."""
    if not source:
        return "none"
    if source.startswith("embedded:"):
        from deltalign.data import formats

        return sha256_json([source, sha256_file(formats._embedded_path(source.removeprefix("embedded:")))])
    p = Path(source)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return sha256_json({str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()})
    return f"datasets:{source}@{datasets_revision(source)}"


def datasets_revision(repo_id: str) -> str:
    """The commit a hub data set id resolves to here, offline: the hub cache's ``refs/main`` (what ``load_dataset``
    downloaded last), else the newest commit folder in datasets' own cache (what it loads offline), else
    ``unresolved`` (not downloaded yet; ``Pipeline.run`` records the revision once the stage has read it)."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}" / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    import datasets.config
    from datasets.naming import camelcase_to_snakecase

    *namespace, name = repo_id.split("/")
    root = Path(datasets.config.HF_DATASETS_CACHE) / "___".join([*namespace, camelcase_to_snakecase(name)])
    commits = [Path(d) for d in glob.glob(str(root / "*" / "*" / "*")) if os.path.isdir(d)]
    return max(commits, key=lambda d: d.stat().st_mtime).name if commits else "unresolved"


def rules_fingerprint(rules: dict) -> dict[str, str]:
    """For each user reward ``module:function`` in a stage's ``rules``: the hash of its module's source file (found
    without importing the module itself; ``missing`` if it cannot be found). Built-in rules are deltalign code."""
    out = {}
    for spec in sorted(s for s in rules if ":" in s):
        try:
            found = importlib.util.find_spec(spec.partition(":")[0])
        except (ImportError, ValueError):
            found = None
        origin = Path(found.origin) if found is not None and found.origin else None
        out[spec] = sha256_file(origin) if origin is not None and origin.is_file() else "missing"
    return out


def launch_fingerprint(cfg) -> dict:
    """What the launch changes about a training stage's results: the global batch (processes x ``batch_size`` x
    ``grad_accum``; ``WORLD_SIZE`` as ``accelerate launch``/torchrun set it), the DeepSpeed config (the JSON's
    content, and the ``ACCELERATE_DEEPSPEED_*`` settings accelerate exports beside it) and mixed precision. A
    plain ``python -m deltalign`` run and a one-process ``accelerate launch`` hash the same."""
    if not hasattr(cfg, "batch_size"):  # not a training stage (export)
        return {}
    env = os.environ
    out: dict = {"global_batch": int(env.get("WORLD_SIZE", "1")) * cfg.batch_size * getattr(cfg, "grad_accum", 1)}
    if env.get("ACCELERATE_MIXED_PRECISION", "no").lower() != "no":
        out["mixed_precision"] = env["ACCELERATE_MIXED_PRECISION"].lower()
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        ds = {k: v for k, v in env.items() if k.startswith("ACCELERATE_DEEPSPEED_") and not k.endswith("CONFIG_FILE")}
        path = Path(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", ""))
        # parsed, so formatting does not count
        ds["config"] = json.loads(path.read_text()) if path.is_file() else f"missing:{path}"
        out["deepspeed"] = ds
    return out


def software_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED` (``none`` if one is missing)."""
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "none"

    return {name: version(name) for name in VERSIONED}


class RunLocked(FileExistsError):
    """Another live process is running on this run directory (the CLI prints it as a one-line error)."""


class RunDirError(OSError):
    """The run directory cannot be used (a file, a read-only file system, no permission, a full disk): the CLI
    prints it as a one-line error naming the path, exit 2."""


def _unusable(path: Path, e: OSError) -> RunDirError:
    return RunDirError(f"run directory {path}: cannot write {e.filename or path} ({e.strerror or e}); "
                       "free space, fix its permissions or use another --run-dir")


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run_dir>/.lock`` (``flock``, with this pid written in it) for the block, or raise :class:`RunLocked`
    naming the holder's pid. The kernel drops the lock when its holder exits, however it dies, so a killed run
    never leaves a stale lock; a refused run changes nothing in the run directory. A run directory that cannot be
    written raises :class:`RunDirError`."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--run-dir {run_dir} is a file, not a directory; name a directory (it is created)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise _unusable(run_dir, e) from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunLocked(f"run directory {run_dir} is in use by another run (pid {holder}); wait for it to finish "
                        "or use another --run-dir") from None
    try:
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
        except OSError as e:
            raise _unusable(run_dir, e) from None
        yield
    finally:
        f.close()  # releases the lock


def _pickled(folder: Path) -> str:
    return " (a pickled adapter_model.bin is there, which deltalign never loads)" \
        if (folder / "adapter_model.bin").exists() else ""


UNREADABLE = object()
"""What :meth:`StageDir.read` returns for a file that exists but does not parse (a truncated or damaged copy)."""


class StageDir:
    """One stage's folder in a run."""

    def __init__(self, run_dir: Path, stage: str):
        self.path = Path(run_dir) / stage
        self.stage = stage

    def read(self, name: str):
        """The JSON object in this stage's file ``name``: None if absent, :data:`UNREADABLE` if it does not parse
        as an object (set aside by :meth:`prepare`, reported by ``status``)."""
        f = self.path / name
        if not f.exists():
            return None
        try:
            value = json.loads(f.read_text())
        except (OSError, ValueError):
            return UNREADABLE
        return value if isinstance(value, dict) else UNREADABLE

    def manifest(self) -> dict | None:
        m = self.read(MANIFEST)
        return None if m is UNREADABLE else m

    def started_hash(self) -> str:
        """The hash an unfinished run was started with ("" if none, or unreadable)."""
        v = self.read(STARTED)
        return str(v.get("hash", "")) if isinstance(v, dict) else ""

    def unreadable(self) -> list[str]:
        """This stage's own bookkeeping files that exist but cannot be read."""
        return [n for n in (MANIFEST, STARTED) if self.read(n) is UNREADABLE]

    def outputs(self) -> list[Path]:
        """What the stage left for others to read: its files and folders' files, less its bookkeeping (manifest,
        inputs), its checkpoints, temporaries, what was set aside and what it keeps only to resume."""
        skip = {self.path / MANIFEST, self.path / STARTED}
        return sorted(f for f in self.path.rglob("*") if f.is_file() and f not in skip
                      and not any(part.startswith(".") or part == "checkpoints" or part.endswith(verify.CORRUPT)
                                  for part in f.relative_to(self.path).parts)
                      and not any(fnmatch.fnmatch(f.name, p) for p in RESUME_ONLY))

    def damaged(self) -> list[str]:
        """``"<file>: <what is wrong>"`` for each output of a finished stage that does not read back whole: a
        file its manifest lists that is missing or does not match its sha256, a safetensors file cut short, a
        JSON file that does not parse, an adapter folder without its safetensors weights. Reads headers and
        hashes the (small) top-level safetensors files; loads no tensor."""
        m = self.manifest()
        if m is None:
            return []
        out = []
        for name, digest in sorted((m.get("files") or {}).items()):
            f = self.path / name
            if not f.is_file():
                out.append(f"{f}: missing{_pickled(f.parent)}")
            elif why := verify.safetensors_problem(f):
                out.append(f"{f}: {why}")
            elif sha256_file(f) != digest:
                out.append(f"{f}: does not match its sha256 in {MANIFEST} (damaged)")
        for f in self.outputs():
            if f.suffix == ".safetensors" and f.name not in (m.get("files") or {}):
                why = verify.safetensors_problem(f)
            elif f.suffix == ".json":
                why = verify.json_problem(f, obj=f.name == "adapter_config.json")  # a baseline may be null
            else:
                continue
            if why and not any(o.startswith(f"{f}:") for o in out):
                out.append(f"{f}: {why}")
        for conf in [f for f in self.outputs() if f.name == "adapter_config.json"]:
            weights = conf.parent / "adapter_model.safetensors"
            if not weights.is_file() and not any(o.startswith(f"{weights}:") for o in out):
                out.append(f"{weights}: missing{_pickled(conf.parent)}")
        return out

    def is_done(self, content_hash: str) -> bool:
        m = self.manifest()
        return m is not None and m.get("hash") == content_hash

    def prepare(self, content_hash: str, inputs: dict, config_yaml: str, log=print) -> None:
        """Make the folder ready to (re)run: archive a finished or unfinished run of other inputs, or one whose
        manifest or inputs file is unreadable (what a crash or a damaged copy leaves); keep a matching unfinished
        run (it resumes from its checkpoint)."""
        if self.path.exists():
            m, bad = self.manifest(), self.unreadable()
            old_hash = (m or {}).get("hash") or self.started_hash()
            if bad or old_hash != content_hash or m is not None:
                broken = self.damaged() if m is not None and old_hash == content_hash else []
                why = (f"{', '.join(str(self.path / b) for b in bad)} unreadable" if bad else "; ".join(broken)
                       if broken else "inputs changed" if old_hash != content_hash else "run again (--force)")
                self.archive(old_hash or "unknown", log, why)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.remove_temp(self.path)  # what a crash in the middle of a write left (the run resumes without it)
        atomic.write_text(self.path / "config.yaml", config_yaml)
        atomic.write_json(self.path / STARTED, {"hash": content_hash, "inputs": inputs})

    def archive(self, old_hash: str, log=print, why: str = "inputs changed") -> Path:
        dest = self.path.parent / ".history" / f"{self.stage}-{old_hash[:12]}-{int(time.time())}"
        for i in range(1, 1000):  # set aside twice within a second (a rerun, then --force)
            if not dest.exists():
                break
            dest = dest.with_name(f"{dest.name.split('.')[0]}.{i}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic.crash_point(f"rename {self.path} -> {dest}")
        os.replace(self.path, dest)
        log(f"[deltalign] {self.stage}: {why}; previous output kept in {dest}")
        return dest

    def finish(self, content_hash: str, inputs: dict, metrics: dict, wall_time: float,
               peak_memory: dict | None = None) -> None:
        files = {f.name: sha256_file(f) for f in self.outputs() if f.parent == self.path
                 and f.suffix == ".safetensors"}
        atomic.write_json(self.path / MANIFEST, {
            "stage": self.stage, "hash": content_hash, "status": "done", "inputs": inputs, "files": files,
            "metrics": metrics, "wall_time_s": round(wall_time, 1), "peak_memory": peak_memory or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        })

    def drop_checkpoints(self) -> None:
        """Remove the resume checkpoints of a finished stage (after its manifest is written)."""
        ckpts = self.path / "checkpoints"
        if ckpts.exists():
            atomic.crash_point(f"delete {ckpts}")
            shutil.rmtree(ckpts, ignore_errors=True)

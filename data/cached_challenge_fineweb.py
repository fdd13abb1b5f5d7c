"""Download the published challenge FineWeb export (shards + tokenizer) from the Hugging Face hub.

    python data/cached_challenge_fineweb.py --variant sp1024 [--train-shards 80] [--out DIR]

The export lives in the dataset repo ``willdepueoai/parameter-golf`` under the folder ``datasets/``:

    datasets/manifest.json
    datasets/datasets/fineweb10B_<variant>/fineweb_val_000000.bin ...
    datasets/datasets/fineweb10B_<variant>/fineweb_train_000000.bin ...
    datasets/tokenizers/<tokenizer files named by the manifest>

The local copy mirrors that folder under the output root (default: the folder holding this script), so
shards land in ``<root>/datasets/fineweb10B_<variant>/`` and tokenizer files in ``<root>/tokenizers/``;
the manifest is kept as ``<root>/manifest.json``.

Manifest layout this tool expects (anything else is reported as an error naming the missing piece):

    {"datasets":   [{"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
                     "stats": {"files_val": <count>, "files_train": <count>, ...}, ...}, ...],
     "tokenizers": [{"name": "fineweb_1024_bpe",
                     "model_path": "tokenizers/fineweb_1024_bpe.model",
                     "vocab_path": "tokenizers/fineweb_1024_bpe.vocab", ...}, ...]}

Tokenizer paths are relative to the ``datasets/`` folder; an entry may instead carry a single ``path``.

Re-running is cheap: files already present and complete (shards: header magic, version and exact size;
tokenizer files: they load) are skipped without contacting the hub. Anything missing or damaged is
downloaded into a private staging folder, verified, and only then renamed over the final name, so an
interrupted or failed run never leaves a half-written file where training would read it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import hf_hub_download

from make_shards import OneLineParser, int_in  # data/ is on sys.path when this runs as a script

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_BYTES = 256 * 4
PROG = "cached_challenge_fineweb.py"


class DownloadError(Exception):
    """A failure reported to the user as one line on stderr (exit status 1)."""


class LocalFolderError(DownloadError):
    """--out cannot hold the files (not a folder, not writable): one line on stderr, exit status 2."""


def out_folder_problem(root: Path, need_write: bool) -> str | None:
    """What stops `root` from holding the download, or None. Looks at `root`, or at its nearest existing ancestor
    when it does not exist yet (it would be created there); writability only when `need_write`."""
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return (f"--out {root} exists and is not a folder" if existing == root
                else f"--out {root} cannot be created: {existing} is not a folder")
    if need_write and not os.access(existing, os.W_OK | os.X_OK):
        return (f"--out {root} is not writable (no write permission)" if existing == root
                else f"--out {root} cannot be created: {existing} is not writable (no write permission)")
    return None


# ----------------------------------------------------------------------------------------------------------
# Local file checks


def shard_problem(path: Path) -> str | None:
    """Return None when `path` is a complete challenge shard, else a short description of what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if size < HEADER_BYTES:
        return f"only {size} bytes, shorter than the {HEADER_BYTES}-byte header"
    magic, version, n_tokens = struct.unpack("<3i", head)
    if magic != SHARD_MAGIC:
        return f"bad magic {magic} (expected {SHARD_MAGIC})"
    if version != SHARD_VERSION:
        return f"unsupported version {version} (expected {SHARD_VERSION})"
    if n_tokens < 0:
        return f"negative token count {n_tokens} in header"
    expected = HEADER_BYTES + 2 * n_tokens
    if size != expected:
        return f"header says {n_tokens} tokens, so {expected} bytes, but the file has {size} bytes"
    return None


def tokenizer_problem(path: Path) -> str | None:
    """Return None when `path` looks like a complete tokenizer artifact, else what is wrong with it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if not data:
        return "empty"
    if path.suffix == ".model":
        try:
            import sentencepiece as spm
        except ImportError:  # cannot check deeper without sentencepiece; a non-empty file has to do
            return None
        try:
            spm.SentencePieceProcessor(model_proto=data)
        except Exception:
            return "not a loadable SentencePiece model"
    elif path.suffix == ".json":
        try:
            json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "not valid JSON"
    elif path.suffix == ".vocab":
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "not UTF-8 text"
    return None


def file_problem(path: Path) -> str | None:
    return shard_problem(path) if path.suffix == ".bin" else tokenizer_problem(path)


# ----------------------------------------------------------------------------------------------------------
# Manifest


@dataclass(frozen=True)
class Plan:
    """What the manifest says about one variant."""

    dataset: str
    val_shards: int
    train_shards_available: int
    tokenizer_files: tuple[str, ...]  # paths relative to REMOTE_ROOT, e.g. "tokenizers/fineweb_1024_bpe.model"


def _safe_relpath(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DownloadError(f"manifest.json: {where} must be a non-empty string, got {value!r}")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise DownloadError(f"manifest.json: {where} must be a relative path inside the export, got {value!r}")
    return p.as_posix()


def _count(stats: dict, key: str, dataset: str) -> int:
    value = stats.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DownloadError(f"manifest.json: dataset {dataset!r} lacks an integer stats.{key} (got {value!r})")
    try:
        n = int(value)
    except ValueError:
        raise DownloadError(f"manifest.json: dataset {dataset!r} has non-integer stats.{key} {value!r}") from None
    if n < 0:
        raise DownloadError(f"manifest.json: dataset {dataset!r} has negative stats.{key} {n}")
    return n


def dataset_name(variant: str) -> str:
    return f"fineweb10B_{variant}"


def parse_manifest(manifest: Any, variant: str) -> Plan:
    """Pick the entries for `variant` out of a parsed manifest.json (layout in the module docstring)."""
    if not isinstance(manifest, dict):
        raise DownloadError("manifest.json: expected a JSON object at the top level")
    datasets = manifest.get("datasets")
    if not isinstance(datasets, list):
        raise DownloadError("manifest.json: expected a top-level 'datasets' list")
    tokenizers = manifest.get("tokenizers")
    if not isinstance(tokenizers, list):
        raise DownloadError("manifest.json: expected a top-level 'tokenizers' list")
    want = dataset_name(variant)
    entry = next((d for d in datasets if isinstance(d, dict) and d.get("name") == want), None)
    if entry is None:
        prefix = dataset_name("")
        known = sorted(
            str(d["name"])[len(prefix):]
            for d in datasets
            if isinstance(d, dict) and isinstance(d.get("name"), str) and d["name"].startswith(prefix)
        )
        raise DownloadError(
            f"unknown variant {variant!r}: the manifest has no dataset {want!r}; "
            f"available variants: {', '.join(known) or 'none'}"
        )
    stats = entry.get("stats")
    if not isinstance(stats, dict):
        raise DownloadError(f"manifest.json: dataset {want!r} lacks a 'stats' object")
    val_shards = _count(stats, "files_val", want)
    train_shards = _count(stats, "files_train", want)
    if val_shards == 0:
        raise DownloadError(f"manifest.json: dataset {want!r} lists no validation shards (stats.files_val = 0)")
    tok_name = entry.get("tokenizer_name")
    if not isinstance(tok_name, str) or not tok_name:
        raise DownloadError(f"manifest.json: dataset {want!r} lacks a 'tokenizer_name'")
    tok = next((t for t in tokenizers if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"manifest.json: tokenizer {tok_name!r} (used by {want!r}) is not in 'tokenizers'")
    files = tuple(
        _safe_relpath(tok[key], f"tokenizer {tok_name!r} {key}")
        for key in ("model_path", "vocab_path", "path")
        if tok.get(key)
    )
    if not files:
        raise DownloadError(
            f"manifest.json: tokenizer {tok_name!r} names no file (expected 'model_path'/'vocab_path' or 'path')"
        )
    return Plan(want, val_shards, train_shards, files)


# ----------------------------------------------------------------------------------------------------------
# Hub access


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hub_endpoint() -> str:
    """The hub URL huggingface_hub talks to (HF_ENDPOINT, else its default)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def describe_hub_error(exc: BaseException, what: str, repo_id: str, revision: str) -> str:
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}"
    if isinstance(exc, (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled)):
        endpoint = hub_endpoint()
        return (
            f"cannot reach the Hugging Face hub ({endpoint}) to fetch {what} from {where}: "
            "offline, or HF_HUB_OFFLINE is set; check the network or HF_ENDPOINT"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return f"dataset repo {repo_id!r} not found on the hub (or not accessible) while fetching {what}"
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in {repo_id!r} while fetching {what}"
    if isinstance(exc, hf_errors.EntryNotFoundError):
        return f"{what} is not in {where} (the export may have moved; check --repo-id/--revision)"
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return f"the hub refused {what} from {where}: {_one_line((str(exc).splitlines() or [type(exc).__name__])[0])}"
    return f"downloading {what} from {where} failed: {type(exc).__name__}: {_one_line(str(exc))}"


class Fetcher:
    """Downloads files of the export into a staging folder, verifies them and moves them into place."""

    def __init__(self, root: Path, repo_id: str, revision: str) -> None:
        self.root = root
        self.repo_id = repo_id
        self.revision = revision
        self.staging: Path | None = None
        self.downloads = 0
        self.root_existed = root.exists()

    def _staging(self) -> Path:
        """The private staging folder, made on first use: before any network access, --out is checked (a local
        problem is a LocalFolderError naming it) and the endpoint about to be contacted is announced."""
        if self.staging is None:
            problem = out_folder_problem(self.root, need_write=True)
            if problem is not None:
                raise LocalFolderError(problem)
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.staging = Path(tempfile.mkdtemp(prefix=".download-staging-", dir=self.root))
            except OSError as exc:
                raise LocalFolderError(f"--out {self.root}: cannot create a folder there ({exc.strerror or exc})") from None
            print(f"connecting to {hub_endpoint()} for dataset {self.repo_id}@{self.revision} "
                  "(if the hub is unreachable this waits for the connection to time out)", flush=True)
        return self.staging

    def fetch(self, rel: str, dest: Path) -> None:
        """Fetch REMOTE_ROOT/rel, verify it, and atomically place it at `dest`."""
        remote = PurePosixPath(REMOTE_ROOT) / rel
        staging = self._staging()  # local problems surface here, not as a download failure
        try:
            got = hf_hub_download(
                repo_id=self.repo_id,
                filename=remote.name,
                subfolder=remote.parent.as_posix(),
                repo_type="dataset",
                revision=self.revision,
                local_dir=staging,
            )
        except Exception as exc:  # every hub failure becomes one line naming the file and the repo
            raise DownloadError(describe_hub_error(exc, remote.as_posix(), self.repo_id, self.revision)) from exc
        self.downloads += 1
        staged = Path(got).resolve()
        problem = file_problem(staged) if staged.is_file() else "missing after download"
        if problem is not None:
            staged.unlink(missing_ok=True)
            raise DownloadError(f"downloaded {remote.as_posix()} is not valid: {problem}; nothing was written")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staged, dest)
        except OSError:  # staging on another filesystem (should not happen): copy beside dest, then rename
            tmp = dest.with_name(dest.name + ".part")
            shutil.copyfile(staged, tmp)
            os.replace(tmp, dest)

    def close(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        if not self.root_existed:  # a failed first run leaves no empty folder behind
            try:
                self.root.rmdir()
            except OSError:
                pass


# ----------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Download the challenge FineWeb export (all validation shards, the first N training "
        "shards and the tokenizer) from the Hugging Face hub. Complete local files are kept; missing or "
        "damaged ones are fetched, verified and renamed into place.",
    )
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024 (default: %(default)s)")
    p.add_argument(
        "--train-shards",
        type=int_in(0, 2**31 - 1),
        default=DEFAULT_TRAIN_SHARDS,
        metavar="N",
        help="number of training shards to fetch, 100M tokens each (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        metavar="DIR",
        help="root folder; files go to DIR/datasets/fineweb10B_<variant>/ and DIR/tokenizers/ "
        "(default: the folder holding this script)",
    )
    p.add_argument("--repo-id", default=DEFAULT_REPO_ID, help="Hugging Face dataset repo (default: %(default)s)")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the repo (default: %(default)s)")
    p.add_argument(
        "--refresh-manifest",
        action="store_true",
        help="download manifest.json again even when a local copy exists",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_local_manifest(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", args.variant):
        raise DownloadError(f"unknown variant {args.variant!r}: expected a name such as sp1024")
    root: Path = args.out.expanduser().resolve()
    problem = out_folder_problem(root, need_write=False)  # a complete read-only copy is fine; a file is not
    if problem is not None:
        raise LocalFolderError(problem)
    fetcher = Fetcher(root, args.repo_id, args.revision)
    try:
        manifest_path = root / "manifest.json"

        def fetch_manifest() -> Any:
            fetcher.fetch("manifest.json", manifest_path)
            fetched = load_local_manifest(manifest_path)
            if fetched is None:
                raise DownloadError(f"{manifest_path}: downloaded manifest is not valid JSON")
            return fetched

        def plan_for(manifest: Any) -> Plan:
            plan = parse_manifest(manifest, args.variant)
            if args.train_shards > plan.train_shards_available:
                raise DownloadError(
                    f"--train-shards {args.train_shards} is more than the {plan.train_shards_available} "
                    f"training shards {plan.dataset} has on {args.repo_id}"
                )
            return plan

        local = None if args.refresh_manifest else load_local_manifest(manifest_path)
        if local is None:
            plan = plan_for(fetch_manifest())
        else:
            try:
                plan = plan_for(local)
            except DownloadError as stale:  # the local copy may predate the published one: ask the hub once
                try:
                    fresh = fetch_manifest()
                except DownloadError:
                    raise stale from None
                plan = plan_for(fresh)

        shard_dir = PurePosixPath("datasets") / plan.dataset
        wanted = [(shard_dir / f"fineweb_val_{i:06d}.bin").as_posix() for i in range(plan.val_shards)]
        wanted += [(shard_dir / f"fineweb_train_{i:06d}.bin").as_posix() for i in range(args.train_shards)]
        wanted += list(plan.tokenizer_files)

        todo: list[str] = []
        for rel in wanted:
            problem = file_problem(root / rel)
            if problem is not None:
                if problem != "missing":
                    print(f"{root / rel}: {problem}; fetching it again", flush=True)
                todo.append(rel)
        print(
            f"{plan.dataset}: {plan.val_shards} val + {args.train_shards} train shards + "
            f"{len(plan.tokenizer_files)} tokenizer files; {len(wanted) - len(todo)} already complete, "
            f"{len(todo)} to download into {root}",
            flush=True,
        )
        disable = True if args.no_progress else None  # None: tqdm shows bars only on a terminal
        for rel in tqdm(todo, desc="files", unit="file", disable=disable):
            fetcher.fetch(rel, root / rel)
    finally:
        fetcher.close()
    print(f"shards: {root / shard_dir}", flush=True)
    print(f"tokenizer: {', '.join(str(root / t) for t in plan.tokenizer_files)}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed as one line)
        return int(exc.code or 0)

    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hf_logging

    old_level = hf_logging.get_verbosity()
    bars_were_disabled = are_progress_bars_disabled()
    hf_logging.set_verbosity_error()  # the hub's retry chatter would bury our one-line errors
    if args.no_progress:
        disable_progress_bars()
    try:
        return run(args)
    except LocalFolderError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except DownloadError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted; complete files were kept, nothing half-written", file=sys.stderr)
        return 130
    finally:
        hf_logging.set_verbosity(old_level)
        if args.no_progress and not bars_were_disabled:
            enable_progress_bars()


if __name__ == "__main__":
    sys.exit(main())

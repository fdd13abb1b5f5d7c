"""Download the challenge's FineWeb export (shards + tokenizer) from a Hugging Face dataset repository.

    python data/cached_challenge_fineweb.py --variant sp1024 [--train-shards 80] [--out DIR] [--repo-id REPO]

The repository (--repo-id, else $MATCHED_FINEWEB_REPO_ID, else willdepueoai/parameter-golf; the SP4096 and SP8192
exports are in kevclark/parameter-golf, the CaseOps one, variant sp8192_lossless_caps_caseops_v1_reserved, in
romeerp/parameter-golf-caseops-v1) holds, under datasets/:

    datasets/manifest.json
    datasets/datasets/fineweb10B_<variant>/fineweb_val_000000.bin ... fineweb_train_000000.bin ...
                                          (fineweb_val_bytes_000000.bin ...: byte sidecars, when the manifest says)
    datasets/tokenizers/<the tokenizer files the manifest names>

and the local copy mirrors that folder under --out (default: the folder holding this script): shards in
<out>/datasets/fineweb10B_<variant>/, tokenizer files in <out>/tokenizers/, the manifest as <out>/manifest.json.
The manifest is read as

    {"datasets":   [{"name": "fineweb10B_sp1024", "tokenizer_name": "fineweb_1024_bpe",
                     "stats": {"files_val": <count>, "files_train": <count>},
                     "val_bytes_glob": "<any>"  (optional: one byte sidecar per val shard)}, ...],
     "tokenizers": [{"name": "fineweb_1024_bpe", "model_path": "tokenizers/fineweb_1024_bpe.model",
                     "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}, ...]}

Files already complete locally are kept without contacting the hub (shards: header magic, version and size). The
others come through huggingface_hub.snapshot_download (parallel, resumable, its own progress bars and cache), are
checked, and are hard-linked (across filesystems: copied) into place under a temporary name, then renamed: nothing
is ever half-written under a final name. A local manifest is reused only for the repository it came from (the tool
records that in it); otherwise the repository's own is fetched.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path, PurePosixPath

from huggingface_hub import snapshot_download

from make_shards import shard_problem  # data/ is on sys.path when this runs as a script

DEFAULT_REPO = "willdepueoai/parameter-golf"
REMOTE = "datasets"  # the export's folder in the repository
SOURCE_KEY = "downloaded_from"  # added to the local manifest: the repository it came from


class DownloadError(Exception):
    """One `error:` line, exit status 1."""


def local_problem(path: Path) -> str | None:
    """None when a local file is complete: a shard by its header and size, any other file by being non-empty."""
    if path.suffix == ".bin":
        return shard_problem(path)
    return None if path.is_file() and path.stat().st_size else "missing" if not path.exists() else "empty"


def hub_error(exc: Exception, repo: str) -> str:
    from huggingface_hub import constants, errors

    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"dataset repository {repo} not found on the hub (or not accessible)"
    if isinstance(exc, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
        return (f"cannot reach the Hugging Face hub ({endpoint}) for {repo}, and its local cache lacks the files; "
                "check the network or HF_ENDPOINT")
    return f"downloading from {repo} failed: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def fetch(repo: str, rels: list[str], force: bool = False) -> dict[str, Path]:
    """Download REMOTE/rel of every rel in one parallel snapshot_download (into the hub's cache); their paths."""
    remote = [f"{REMOTE}/{rel}" for rel in rels]
    try:
        folder = Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=remote, max_workers=8,
                                        force_download=force))
    except Exception as exc:  # every hub failure becomes one line naming the repository
        raise DownloadError(hub_error(exc, repo)) from None
    missing = [r for r in remote if not (folder / r).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the files asked for)" if len(missing) > 1 else ""
        raise DownloadError(f"{repo} has no {missing[0]}{more}")
    return {rel: folder / r for rel, r in zip(rels, remote)}


def place(src: Path, dest: Path) -> None:
    """Put the cache's file at `dest` through a temporary name beside it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src.resolve(), tmp)  # the cache's blob itself: no second copy on disk
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_manifest(root: Path, repo: str) -> dict | None:
    """The local manifest, when this tool saved it from `repo`."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get(SOURCE_KEY) == repo else None


def fetch_manifest(root: Path, repo: str) -> dict:
    path = fetch(repo, ["manifest.json"])["manifest.json"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DownloadError(f"{repo}: {REMOTE}/manifest.json is not JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{repo}: {REMOTE}/manifest.json is not a JSON object")
    manifest[SOURCE_KEY] = repo
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".manifest.json.part"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, root / "manifest.json")
    return manifest


def plan(manifest: dict, repo: str, variant: str, train_shards: int) -> list[str]:
    """The files of `variant` to have locally, relative to REMOTE: every val shard (and its byte sidecar when the
    manifest's entry has val_bytes_glob, as the CaseOps export's does), the first `train_shards` train shards and the
    tokenizer files. DownloadError naming the repository when its manifest cannot provide them."""
    def entry(kind: str, name: str) -> dict | None:
        items = manifest.get(kind)
        return next((e for e in items if isinstance(e, dict) and e.get("name") == name), None) \
            if isinstance(items, list) else None

    dataset = entry("datasets", f"fineweb10B_{variant}")
    if dataset is None:
        offered = sorted(str(d.get("name"))[len("fineweb10B_"):] for d in manifest.get("datasets") or []
                         if isinstance(d, dict) and str(d.get("name")).startswith("fineweb10B_"))
        raise DownloadError(f"{repo} has no variant {variant!r}; it offers: {', '.join(offered) or 'none'}")
    try:
        n_val, n_train = (int(dataset["stats"][k]) for k in ("files_val", "files_train"))
        tokenizer = entry("tokenizers", dataset["tokenizer_name"]) or {}
    except (KeyError, TypeError, ValueError) as exc:
        raise DownloadError(f"{repo}: manifest entry fineweb10B_{variant} lacks {exc} (stats.files_val, "
                            "stats.files_train, tokenizer_name)") from None
    if train_shards > n_train:
        raise DownloadError(f"--train-shards {train_shards}: {repo} has {n_train} train shards of {variant}")
    files = [str(tokenizer[k]) for k in ("model_path", "vocab_path", "path") if tokenizer.get(k)]
    if not files or any(PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts for f in files):
        raise DownloadError(f"{repo}: the manifest names no tokenizer file inside the export for {variant} "
                            f"(tokenizer {dataset['tokenizer_name']!r}: {files})")
    shards = f"datasets/fineweb10B_{variant}"
    sidecars = [f"{shards}/fineweb_val_bytes_{i:06d}.bin" for i in range(n_val)] * bool(dataset.get("val_bytes_glob"))
    return ([f"{shards}/fineweb_val_{i:06d}.bin" for i in range(n_val)] + sidecars
            + [f"{shards}/fineweb_train_{i:06d}.bin" for i in range(train_shards)] + files)


def token_count(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(12)[8:12], "little", signed=True)


def check_sidecars(repo: str, wanted: list[str], where: dict[str, Path]) -> None:
    """Each byte sidecar holds as many counts as its val shard holds tokens (files at `where`, else local)."""
    for rel in (r for r in wanted if "/fineweb_val_bytes_" in r):
        shard = rel.replace("/fineweb_val_bytes_", "/fineweb_val_")
        n_counts, n_tokens = (token_count(where[r]) for r in (rel, shard))
        if n_counts != n_tokens:
            raise DownloadError(f"{repo}: {REMOTE}/{rel} holds {n_counts} byte counts but its shard {shard} "
                                f"{n_tokens} tokens")


def check_writable(root: Path) -> None:
    """Before the hub is asked for anything: an OSError naming --out when files cannot be written there."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".write_test").touch()
    (root / ".write_test").unlink()


def download(root: Path, repo: str, variant: str, train_shards: int) -> None:
    manifest = read_manifest(root, repo)
    try:
        wanted = plan(manifest, repo, variant, train_shards) if manifest else None
    except DownloadError:  # the saved copy may predate the repository's current manifest
        wanted = None
    if wanted is None:
        check_writable(root)
        wanted = plan(fetch_manifest(root, repo), repo, variant, train_shards)
    todo = [rel for rel in wanted if local_problem(root / rel) is not None]
    print(f"{variant} from {repo}: {len(wanted) - len(todo)} of {len(wanted)} files complete in {root}, "
          f"{len(todo)} to download")
    if not todo:
        check_sidecars(repo, wanted, {rel: root / rel for rel in wanted})
        return
    check_writable(root)
    fetched = fetch(repo, todo)
    if bad := [rel for rel in todo if rel.endswith(".bin") and shard_problem(fetched[rel])]:
        fetched.update(fetch(repo, bad, force=True))  # a damaged cache entry (a hard link edited in place, say)
    for rel in bad:
        if problem := shard_problem(fetched[rel]):
            raise DownloadError(f"{repo}: downloaded {REMOTE}/{rel} is not a valid shard ({problem})")
    check_sidecars(repo, wanted, {**{rel: root / rel for rel in wanted}, **fetched})
    for rel in todo:  # only once every file of the batch is known good
        place(fetched[rel], root / rel)
    sidecars = sum("/fineweb_val_bytes_" in rel for rel in wanted)
    print(f"shards{f' and {sidecars} byte sidecars' if sidecars else ''} in "
          f"{root / 'datasets' / f'fineweb10B_{variant}'}, tokenizer in {root / 'tokenizers'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Download the challenge FineWeb export (every validation shard and, "
                                "where the export has them, its byte sidecar; the first N training shards; the "
                                "tokenizer) from the Hugging Face hub.")
    p.add_argument("--variant", default="sp1024", help="tokenizer family, e.g. sp1024, sp8192, "
                   "sp8192_lossless_caps_caseops_v1_reserved (CaseOps, with byte sidecars) (default: %(default)s)")
    p.add_argument("--train-shards", type=int, default=80, metavar="N",
                   help="training shards to fetch, 100M tokens each (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, metavar="DIR",
                   help="root folder: DIR/datasets/fineweb10B_<variant>/, DIR/tokenizers/ (default: this folder)")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID") or DEFAULT_REPO,
                   help="Hugging Face dataset repository (default: $MATCHED_FINEWEB_REPO_ID, else %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.train_shards < 0:
        p.error(f"--train-shards {args.train_shards}: expected a count >= 0")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a folder")
    if args.no_progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        download(args.out.resolve(), args.repo_id, args.variant, args.train_shards)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the local side: a folder that cannot be written, a full disk
        print(f"error: --out {args.out}: {exc.strerror or exc} ({exc.filename})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

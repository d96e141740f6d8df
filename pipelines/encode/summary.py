"""What the job says on the console when it ends."""
from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def summary_lines(cfg, manifest: dict, rate: float, n_skipped: int, n_declared: int) -> list[str]:
    """The summary line, then warnings: many rejected files, skipped entries, COCO sizes."""
    from scatstore.pipelines.report import report

    from .manifest import REJECTED_FILE, SKIPPED_FILE

    r = report(cfg.out, manifest=manifest)
    speed = f", {rate:.0f} img/s" if rate else ""
    ratio = f" ({r['bytes_ratio']:.3f}× the raw pixel bytes" if r["bytes_ratio"] else ""
    if ratio and r["ratio_vs_jpeg_q90"]:
        ratio += f", {r['ratio_vs_jpeg_q90']:.2f}× a q90 JPEG of the frame"
    ratio += ")" if ratio else ""
    lines = [f"encoded {r['count']:,} samples ({r['rejected']} rejected, {n_skipped} skipped) "
             f"into {r['n_shards']} {r['format']} shards: {human_bytes(r['bytes_stored'])}, "
             f"{human_bytes(r['bytes_per_sample'])}/sample{ratio}{speed} → {cfg.out}"]
    n_rejected = manifest["rejected"]
    if n_rejected and n_rejected >= 0.1 * (n_rejected + manifest["count"]):
        # a wrong SRC (or a damaged copy of it) shows here first: say so, not only in the counts
        lines.append(f"warning: {n_rejected} of {n_rejected + manifest['count']} source files "
                     f"were rejected; their reasons are in {cfg.out / REJECTED_FILE}")
    if n_skipped:
        lines.append(f"warning: {n_skipped} source entries were skipped (symlinks out of SRC, "
                     f"unreadable or empty folders, bad COCO entries); listed in "
                     f"{cfg.out / SKIPPED_FILE}")
    if n_declared:
        lines.append(f"warning: {n_declared} COCO images differ in size from their declared "
                     "width/height; their boxes were scaled to the decoded image "
                     "(meta 'declared_size')")
    return lines

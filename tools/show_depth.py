"""Colour each token of a text by the recursion depth the MoR router gives it (HTML and PNG).

    python tools/show_depth.py --checkpoint runs/tiny/checkpoints --text "def main():" \\
        [--generate 64] [--tokenizer DIR] --output depth

writes `depth.html` and `depth.png`. Depths come from causal threshold routing (the decoding
rule), so they are the depths the tokens get when generated. `--generate N` first continues the
text greedily by N tokens. The PNG uses matplotlib where it is installed, else PIL.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path
from typing import Optional, Sequence

# light-to-dark, one colour per depth 0..8 (0: no recursion, vanilla/unrouted tokens)
PALETTE = ("#f0f0f0", "#fde725", "#7ad151", "#22a884", "#2a788e", "#414487", "#440154", "#2d0a3e", "#1a0526")


def depth_colour(depth: int) -> str:
    return PALETTE[min(max(depth, 0), len(PALETTE) - 1)]


def text_colour(depth: int) -> str:
    return "#000000" if depth <= 3 else "#ffffff"


def render_html(pieces: Sequence[str], depths: Sequence[int], num_recursions: int, title: str = "") -> str:
    """A standalone HTML page: one coloured span per token (hover shows the depth) and a legend."""
    spans = []
    for piece, depth in zip(pieces, depths):
        body = html.escape(piece).replace("\n", "&#8629;<br>")
        style = f"background:{depth_colour(depth)};color:{text_colour(depth)}"
        spans.append(f'<span class="t" style="{style}" title="depth {depth}">{body}</span>')
    legend = " ".join(
        f'<span class="t" style="background:{depth_colour(d)};color:{text_colour(d)}">depth {d}</span>'
        for d in range(1, num_recursions + 1)
    )
    mean = sum(depths) / max(1, len(depths))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>MoR recursion depth</title><style>"
        "body{font-family:monospace;max-width:60em;margin:2em auto;line-height:1.9}"
        ".t{white-space:pre-wrap;padding:1px 0;border-radius:2px}</style></head><body>"
        f"<h3>{html.escape(title)}</h3><p>{legend} &nbsp; mean depth {mean:.2f} over {len(depths)} tokens</p>"
        f"<p>{''.join(spans)}</p></body></html>\n"
    )


def _lines(pieces: Sequence[str], depths: Sequence[int], width: float, measure=len) -> list[list[tuple[str, int]]]:
    """Tokens wrapped into lines no wider than `width` (as `measure` counts); newlines break lines."""
    lines: list[list[tuple[str, int]]] = [[]]
    used = 0.0
    for piece, depth in zip(pieces, depths):
        for i, part in enumerate(piece.split("\n")):
            if i > 0:
                lines.append([])
                used = 0.0
            if not part:
                continue
            size = measure(part)
            if used + size > width and used:
                lines.append([])
                used = 0.0
            lines[-1].append((part, depth))
            used += size
    return lines


def _legend(num_recursions: int) -> list[tuple[str, int]]:
    return [(f" depth {d} ", d) for d in range(1, num_recursions + 1)]


def render_png(pieces: Sequence[str], depths: Sequence[int], num_recursions: int, path: str, width: int = 80) -> str:
    """Write the PNG (matplotlib if installed, else PIL); returns which one drew it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        lines = _lines(pieces, depths, width)
        char_w, line_h = 0.105, 0.26  # inches per character / line at 10pt monospace
        fig = plt.figure(figsize=(width * char_w + 0.4, (len(lines) + 2) * line_h + 0.2))
        height = fig.get_figheight()
        for row, line in enumerate([_legend(num_recursions), []] + lines):
            x = 0.2
            for text, depth in line:
                fig.text(
                    x / fig.get_figwidth(), 1 - (row + 1) * line_h / height, text, family="monospace", fontsize=10,
                    color=text_colour(depth), bbox=dict(facecolor=depth_colour(depth), edgecolor="none", pad=1),
                )
                x += len(text) * char_w
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    measure = lambda text: probe.textlength(text, font=font)  # noqa: E731
    max_px = width * measure("n")
    left, top, right, bottom = probe.textbbox((0, 0), "Mgy|", font=font)
    line_h = (bottom - top) + 8
    rows = [_legend(num_recursions), []] + _lines(pieces, depths, max_px, measure)
    image = Image.new("RGB", (int(max_px) + 20, len(rows) * line_h + 20), "white")
    draw = ImageDraw.Draw(image)
    for row, line in enumerate(rows):
        x, y = 10.0, 10 + row * line_h
        for text, depth in line:
            extent = measure(text)
            draw.rectangle([x, y, x + extent, y + line_h - 3], fill=depth_colour(depth))
            draw.text((x, y + 2 - top), text, fill=text_colour(depth), font=font)
            x += extent
    image.save(path)
    return "PIL"


def token_depths(model, ids: Sequence[int]) -> list[int]:
    """Recursion depth of every token of `ids` under causal threshold routing."""
    import torch

    from mor_megatron.inference import IncrementalDecoder

    decoder = IncrementalDecoder(model, max_batch=1, max_seq=max(len(ids), 1))
    out = decoder.forward_flat(torch.tensor(list(ids)), torch.zeros(len(ids), dtype=torch.long))
    return out.depths.tolist()


def build_parser() -> argparse.ArgumentParser:
    from mor_megatron.cli import ToolParser, non_negative_int, positive_int

    parser = ToolParser(prog="mor-show-depth", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a step_N checkpoint or the folder holding them")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the text to colour")
    source.add_argument("--text-file", help="read the text from this file")
    parser.add_argument("--tokenizer", help="tokenizer folder or name (default: the run's data.tokenizer)")
    parser.add_argument("--generate", type=non_negative_int, default=0, help="first continue the text greedily by N tokens")
    parser.add_argument("--output", default="depth", help="output prefix: PREFIX.html and PREFIX.png")
    parser.add_argument("--width", type=positive_int, default=80, help="characters per PNG line")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from mor_megatron.errors import run_cli

    return run_cli(lambda: _run(args), args.debug)


def _run(args: argparse.Namespace) -> None:
    from mor_megatron.data.tokenizer import load_tokenizer
    from mor_megatron.inference import Engine, SamplingParams
    from mor_megatron.inference.loading import LoadError, load_model, tokenizer_name

    model, directory, meta = load_model(args.checkpoint)
    name = tokenizer_name(meta, args.tokenizer)
    if name is None:
        raise LoadError("no tokenizer: pass --tokenizer DIR (the run has no data.tokenizer)")
    tokenizer = load_tokenizer(name)
    text = args.text if args.text is not None else Path(args.text_file).read_text(encoding="utf-8")
    ids = tokenizer.encode_batch([text])[0]
    if not ids:
        raise LoadError("the text is empty after tokenization")
    limit = model.config.seq_length
    if args.generate:
        room = limit - len(ids)
        if room < 1:
            raise LoadError(f"the text has {len(ids)} tokens: no room to generate within seq_length={limit}")
        engine = Engine(model, max_batch=1, max_seq=limit)
        (done,) = engine.generate([ids], SamplingParams(max_tokens=min(args.generate, room)))
        ids = ids + done.token_ids
    ids = ids[:limit]
    depths = token_depths(model, ids)
    pieces = [tokenizer.decode([i]) for i in ids]
    nr = model.config.num_recursions if model.config.router != "none" else 0
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    html_path, png_path = f"{args.output}.html", f"{args.output}.png"
    Path(html_path).write_text(render_html(pieces, depths, nr, str(directory)), encoding="utf-8")
    drawer = render_png(pieces, depths, nr, png_path, args.width)
    counts = {d: depths.count(d) for d in sorted(set(depths))}
    print(f"{len(ids)} tokens, depth counts {counts}, mean {sum(depths) / len(depths):.2f}")
    print(f"wrote {html_path} and {png_path} ({drawer})")


if __name__ == "__main__":
    sys.exit(main())

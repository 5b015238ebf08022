"""`tinyseek route`: which routed experts every token of a text goes to, per MoE layer, and the load of each expert,
drawn as one PNG (for papers and READMEs; the playground of `tinyseek serve` shows the same live)."""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import TYPE_CHECKING

from tinyseek.errors import ConfigError, InputError
from tinyseek.loading import add_source_arguments, load_from_arguments

if TYPE_CHECKING:
    import torch

# The playground's colours (tinyseek/serve/static/playground.js), so a PNG and a screenshot read alike.
PALETTE = ["#8ecae6", "#ffb703", "#90be6d", "#f4978e", "#b8a1e3", "#f9c74f", "#84dcc6", "#ffafcc",
           "#a3c4f3", "#e9c46a", "#c7e9b0", "#fbc4ab", "#cdb4db", "#ffd6a5", "#bde0fe", "#d0f4de"]
# Beyond this many tokens the labels under the columns would overlap; the columns are still drawn.
MAX_LABELLED_TOKENS = 80


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyseek route", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_source_arguments(parser)
    parser.add_argument("--text", required=True, help="the text whose tokens are routed")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1400, help="image width in pixels")
    parser.add_argument("--height", type=int, default=900, help="image height in pixels")
    return parser


def routed_experts(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[MoE layers, T, k]: the experts each MoE layer routes each token of one sequence [1, T] to, best first."""
    # torch and the model are imported by the command, not the module, so `tinyseek route --help` stays instant.
    import torch

    from tinyseek.moe import Router

    routed = []
    hooks = [router.register_forward_hook(lambda module, inputs, outputs: routed.append(outputs[0]))
             for router in model.modules() if isinstance(router, Router)]
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(routed)


def expert_colour(expert: int) -> str:
    if expert < len(PALETTE):
        return PALETTE[expert]
    import colorsys

    red, green, blue = colorsys.hls_to_rgb((expert * 137.508) % 360 / 360, 0.76, 0.65)
    return f"#{int(red * 255):02x}{int(green * 255):02x}{int(blue * 255):02x}"


def visible(token_text: str) -> str:
    return token_text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def draw(experts: torch.Tensor, labels: list[str], moe_layers: list[int], num_experts: int, out: Path,
         width: int, height: int) -> None:
    """The expert-per-token picture (one band per MoE layer, a stripe per chosen expert, best on top) above the
    per-layer load histograms with their MaxVio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.ticker import MaxNLocator
    import torch

    layers, tokens, top_k = experts.shape
    dpi = 100
    figure = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    grid = figure.add_gridspec(2, layers, height_ratios=[3, 2], hspace=0.55, wspace=0.25,
                               left=0.07, right=0.98, top=0.93, bottom=0.08)
    picture = figure.add_subplot(grid[0, :])
    # Rows: k stripes per layer and an empty row between layers (NaN draws as background).
    rows = torch.full((layers * (top_k + 1) - 1, tokens), float("nan"))
    for layer in range(layers):
        rows[layer * (top_k + 1): layer * (top_k + 1) + top_k] = experts[layer].T.float()
    colours = ListedColormap([expert_colour(e) for e in range(num_experts)]).with_extremes(bad="white")
    picture.imshow(rows.numpy(), cmap=colours, vmin=-0.5, vmax=num_experts - 0.5, aspect="auto",
                   interpolation="nearest")
    picture.set_yticks([layer * (top_k + 1) + (top_k - 1) / 2 for layer in range(layers)],
                       [f"layer {index}" for index in moe_layers])
    if tokens <= MAX_LABELLED_TOKENS:
        picture.set_xticks(range(tokens), labels, rotation=90, fontsize=8, family="monospace")
    else:
        picture.set_xlabel(f"{tokens} tokens")
    for boundary in range(1, tokens):
        picture.axvline(boundary - 0.5, color="white", linewidth=0.8)
    picture.tick_params(length=0)
    for side in picture.spines.values():
        side.set_visible(False)
    picture.set_title(f"Routed experts per token (top-{top_k}, best on top of each band)", loc="left", fontsize=11)
    handles = [plt.Rectangle((0, 0), 1, 1, color=expert_colour(e)) for e in range(num_experts)]
    picture.legend(handles, [str(e) for e in range(num_experts)], title="expert", ncol=min(num_experts, 16),
                   loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=8, title_fontsize=8, frameon=False)
    for layer in range(layers):
        counts = torch.bincount(experts[layer].flatten(), minlength=num_experts).float()
        mean = counts.mean()
        max_violation = float((counts.max() - mean) / mean)
        axis = figure.add_subplot(grid[1, layer])
        axis.bar(range(num_experts), counts.numpy(), color=[expert_colour(e) for e in range(num_experts)])
        axis.set_title(f"layer {moe_layers[layer]}: MaxVio {max_violation:.2f}", fontsize=10)
        axis.set_xticks(range(num_experts), [str(e) for e in range(num_experts)], fontsize=7)
        axis.spines[["top", "right"]].set_visible(False)
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
        if layer == 0:
            axis.set_ylabel("tokens routed")
    figure.savefig(out, dpi=dpi)
    plt.close(figure)


def main(argv: list[str]) -> int:
    """`argv[0]` is the command name ("route"), as the `tinyseek` dispatcher passes it."""
    args = build_parser().parse_args(argv[1:])
    if args.width < 200 or args.height < 200:
        raise ConfigError(f"--width and --height must be at least 200 pixels, got {args.width}x{args.height}")
    import torch

    from tinyseek.data.tokenizer import encode_prompt

    model, tokenizer = load_from_arguments(args, "cpu")
    config = model.config
    moe_layers = [index for index, layer in enumerate(model.model.layers) if layer.feed_forward_spec.routes]
    if not moe_layers:
        raise ConfigError("this model is dense (ffn_type=dense): its tokens are not routed, so there is nothing to draw")
    prompt = encode_prompt(tokenizer, args.text)
    ids = prompt[1:]  # what follows the document start is what is drawn
    if not ids:
        raise InputError("--text is empty")
    if len(prompt) > config.max_position_embeddings:
        raise InputError(f"--text is {len(prompt)} tokens long; the model has {config.max_position_embeddings} positions")
    experts = routed_experts(model, torch.tensor([prompt]))[:, 1:]
    labels = [visible(tokenizer.decode([token])) for token in ids]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(experts, labels, moe_layers, config.n_routed_experts, args.out, args.width, args.height)
    print(f"wrote {args.out} ({len(ids)} tokens, {len(moe_layers)} MoE layers)")
    return 0

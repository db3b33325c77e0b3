"""Every patchscope preset on the embedded SmolLM2-135M, in one self-contained HTML report.

    python demos/patchscope_demo.py [--out patchscope_demo.html]

Sections: token identity (Precision@1 / surprisal vs the logit lens), entity description
(the seed's "Diana, Princess of Wales" table), a source-layer x target-layer sweep,
attribute extraction, the Figure 4 chain-of-thought patch, and a cross-model patch through
a learned affine map (into a rotated copy of the model, where the true map is known).
PNG versions of the heatmaps are written next to the HTML. Takes a few minutes on 2 CPUs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tl_lenses.models import load_default_model  # noqa: E402
from tl_lenses.patchscopes import view as views  # noqa: E402
from tl_lenses.patchscopes.core import patchscope  # noqa: E402
from tl_lenses.patchscopes.cross import fit_affine_map, random_rotation, rotated_copy  # noqa: E402
from tl_lenses.patchscopes.presets import (  # noqa: E402
    IDENTITY_PROMPT,
    attribute_extraction,
    chain_of_thought,
    entity_description,
    token_identity,
)
from tl_lenses.patchscopes.sweep import patchscope_sweep  # noqa: E402
from tl_lenses.viz.html import esc, page, table_html  # noqa: E402

# The subject sits in a short context: a prompt-initial "France" (no leading space, at
# the attention-sink position) is a poor source on a model this small.
CAPITALS = [(f"I visited {country}", "The capital city of x", capital) for country, capital in
            [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"),
             ("Germany", "Berlin"), ("Spain", "Madrid"), ("Egypt", "Cairo")]]
FIT_TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built it.",
    "Diana, Princess of Wales, was a member of the British royal family. She was the first "
    "wife of Charles III and the mother of Prince William and Prince Harry.",
    "Visual Basic Script is an Active Scripting language developed by Microsoft that is "
    "modeled on Visual Basic. It allows administrators to manage computers.",
    "Python is a high-level, general-purpose programming language. Its design philosophy "
    "emphasizes code readability with the use of significant indentation.",
    "The mitochondrion is an organelle found in the cells of most eukaryotes, such as animals, "
    "plants and fungi. Mitochondria have a double membrane structure.",
    "In mathematics, a prime number is a natural number greater than 1 that is not a product of "
    "two smaller natural numbers. A natural number greater than 1 that is not prime is composite.",
    "The Amazon rainforest is a moist broadleaf tropical rainforest in the Amazon biome that "
    "covers most of the Amazon basin of South America, spanning nine nations.",
    "Johann Sebastian Bach was a German composer and musician of the late Baroque period. He is "
    "known for instrumental compositions such as the Brandenburg Concertos.",
    "A transformer is a deep learning architecture based on the multi-head attention mechanism, "
    "in which text is converted to numerical representations called tokens.",
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal "
    "sub-range of the Himalayas. The China-Nepal border runs across its summit point.",
    "The French Revolution was a period of political and societal change in France that began "
    "with the Estates General of 1789 and ended with the coup of 18 Brumaire in November 1799.",
    "Photosynthesis is a system of biological processes by which photosynthetic organisms, such "
    "as most plants, algae, and cyanobacteria, convert light energy into chemical energy.",
    "The Great Wall of China is a series of fortifications that were built across the historical "
    "northern borders of ancient Chinese states and Imperial China as protection against nomads.",
    "Albert Einstein was a German-born theoretical physicist who is best known for developing "
    "the theory of relativity. He also made important contributions to quantum mechanics.",
    "The Pacific Ocean is the largest and deepest of Earth's five oceanic divisions. It extends "
    "from the Arctic Ocean in the north to the Southern Ocean in the south.",
    "Shakespeare was an English playwright, poet and actor. He is widely regarded as the greatest "
    "writer in the English language and the world's pre-eminent dramatist.",
    "A black hole is a region of spacetime where gravity is so strong that nothing, not even "
    "light and other electromagnetic waves, is capable of possessing enough energy to escape it.",
    "The Roman Empire was the state ruled by the Romans following Octavian's assumption of sole "
    "rule under the Principate in 27 BC. It included territories around the Mediterranean Sea.",
    "Coffee is a beverage brewed from roasted coffee beans. Darkly colored, bitter, and slightly "
    "acidic, coffee has a stimulating effect on humans, primarily due to its caffeine content.",
    "The Internet is the global system of interconnected computer networks that uses the "
    "Internet protocol suite to communicate between networks and devices around the world.",
    "Leonardo da Vinci was an Italian polymath of the High Renaissance who was active as a "
    "painter, draughtsman, engineer, scientist, theorist, sculptor, and architect.",
    "Chess is a board game for two players. It is played on a square board of 64 squares "
    "arranged in an eight-by-eight grid, and each player controls sixteen pieces.",
    "The human heart is an organ that pumps blood through the blood vessels of the circulatory "
    "system, supplying oxygen and nutrients to the tissues and removing carbon dioxide.",
    "Tokyo is the capital and most populous city of Japan. Its metropolitan area is the most "
    "populous in the world, with an estimated 37 million residents as of 2024.",
]


def say(message: str) -> None:
    print(f"[demo] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def cross_model_section(model) -> str:
    """Fit the map from the model into its rotated copy, then patch through it."""
    Q = random_rotation(model.cfg.d_model, seed=0)
    rotated = rotated_copy(model, Q)
    layer, rows = 12, []
    fit = fit_affine_map(model, rotated, FIT_TEXTS, source_layer=layer, target_layer=layer)
    error = (fit.map.A - Q).abs().max().item()
    for source in ["Diana, Princess of Wales", "The Eiffel Tower"]:
        mine = patchscope(model, source, IDENTITY_PROMPT, source_layer=layer, max_new_tokens=4)
        cross = patchscope(model, source, IDENTITY_PROMPT, source_layer=layer,
                           target_model=rotated, transform=fit.map, max_new_tokens=4)
        gap = (cross.logits - mine.logits).abs().max().item()
        rows.append([source, mine.generated_text, cross.generated_text, f"{gap:.2e}"])
    note = (f"<p class='note'>M* = M with its residual basis rotated by a random orthogonal "
            f"Q (d_model={model.cfg.d_model}). Affine map fitted by least squares on "
            f"{fit.n_samples} positions at layer {layer}: R^2 = {fit.r2:.6f}, "
            f"max |A - Q| = {error:.2e}.</p>")
    return ("<h2>Cross-model patchscope through a learned affine map</h2>" + note
            + table_html(["source", "M -> M (identity prompt)", "M -> M* through the map",
                          "max |logit gap|"], rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="patchscope_demo.html")
    args = parser.parse_args()
    say("loading SmolLM2-135M-Instruct")
    report(load_default_model(), Path(args.out), step=3)
    return 0


def run(model, out_dir: Path, context: dict | None = None) -> tuple[str, str]:
    """The main demo's version: every preset, layers every 5 (fewer cases than every 3).

    A tuned lens trained earlier in the demo (``context["tuned_lens"]``) joins the token
    identity comparison.
    """
    out = Path(out_dir) / "patchscopes.html"
    lenses = [context["tuned_lens"]] if context and "tuned_lens" in context else []
    identity, table = report(model, out, step=5, lenses=lenses)
    p_at_1 = ", ".join(f"{layer}: {p:.2f}" for layer, p in
                       zip(identity.layers[::5], identity.precision_at_1[::5].tolist()))
    rows = "".join(f"<li>l={layer}: {esc(text)}</li>" for layer, text in
                   list(zip(table.layers, table.generations))[::6])
    summary = (f"<p><a href='{out.name}'>All presets</a> (token identity, entity description, "
               f"layer sweep, attribute extraction, chain of thought, cross-model). Token "
               f"identity Precision@1 by layer: {p_at_1}. 'Diana, Princess of Wales' "
               f"described from layer:</p><ul>{rows}</ul>")
    return "Patchscopes", summary


def report(model, out: Path, step: int, lenses=()):
    """Write every preset's section into ``out``; returns (identity result, Diana table)."""
    stem = out.with_suffix("")
    start = time.perf_counter()
    every3 = list(range(0, model.cfg.n_layers + 1, step))
    sections = []

    say("token identity")
    identity = token_identity(model, "The Eiffel Tower is in the city of", lenses=lenses)
    sections.append(views.token_identity_html(identity))
    views.token_identity_png(identity, f"{stem}_identity.png")

    say("entity description")
    table = entity_description(model, "Diana, Princess of Wales", max_new_tokens=20)
    sections.append(views.generation_table_html(table))

    say("layer x layer sweep")
    sweep = patchscope_sweep(model, "Diana, Princess of Wales", IDENTITY_PROMPT,
                             source_layers=every3, target_layers=every3, max_new_tokens=3)
    sections.append(views.sweep_html(sweep, title="'Wales' (Diana, Princess of Wales) into "
                                     "the identity prompt: top-1 per (l, l*); hover for the "
                                     "3-token generation"))
    views.sweep_png(sweep, f"{stem}_sweep.png")

    say("attribute extraction")
    attribute = attribute_extraction(model, CAPITALS, source_layers=every3,
                                     target_layers=every3, max_new_tokens=5)
    sections.append(views.attribute_html(
        attribute, title=f"Attribute extraction: capital cities ({len(CAPITALS)} countries)"))
    views.attribute_png(attribute, f"{stem}_attribute.png")

    say("chain of thought")
    cot = chain_of_thought(model, source_layers=every3, target_layers=every3,
                           max_new_tokens=5)
    sections.append(views.sweep_html(
        cot, title="Chain of thought (Figure 4): 'the company that created Visual Basic "
        "Script' into 'The current CEO of' (composed prompt, masked)"))
    best = max(range(len(cot)), key=lambda c: float(cot.top_probs[c, 0]))
    sections.append(f"<p class='note'>most confident case: l={int(cot.source_layer[best])}, "
                    f"l*={int(cot.target_layer[best])}: {esc(cot.generations()[best])!s}</p>")

    say("cross-model map")
    sections.append(cross_model_section(model))

    elapsed = time.perf_counter() - start
    sections.append(f"<p class='note'>generated in {elapsed:.0f} s on "
                    f"{torch.get_num_threads()} CPU threads</p>")
    out.write_text(page("Patchscopes on SmolLM2-135M-Instruct", *sections), encoding="utf-8")
    print(f"wrote {out} and {stem}_*.png in {elapsed:.0f} s")
    return identity, table


if __name__ == "__main__":
    sys.exit(main())

"""esegeta.CRP beside zennit-crp itself, which cannot be installed beside esegeta (it pins zennit<=0.4.6).

Install zennit-crp without its dependencies into a folder of its own and point Python at it:

    pip install --no-deps --target /tmp/crp zennit-crp==0.6.0
    PYTHONPATH=/tmp/crp:. python benchmarks/crp_upstream.py

On the digits classifier, conditions on channels of ``layer2`` and ``layer1`` (one, several, all),
``CondAttribution(model)(x, [{"y": [t], layer: channels}], EpsilonPlusFlat())`` against
``esegeta.explain(..., "esegeta.CRP", conditions=...)``: the largest absolute difference and the largest
value of each heatmap.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def main() -> None:
    import esegeta
    from conftest import digits_case
    from esegeta.compat import import_torchvision

    import_torchvision()
    from crp.attribution import CondAttribution
    from zennit.composites import EpsilonPlusFlat

    case = digits_case()
    print("| conditions | max abs difference | max abs value |")
    print("|---|---|---|")
    for conditions in ({"layer2": [0]}, {"layer2": [3, 5, 7]}, {"layer2": list(range(32))}, {"layer1": [2, 4]}):
        model = copy.deepcopy(case.model).eval()
        upstream = CondAttribution(model)(case.x.clone().requires_grad_(True), [{"y": [case.target], **conditions}],
                                          EpsilonPlusFlat()).heatmap
        ours = esegeta.explain(case.model, case.x, "esegeta.CRP", target=case.target, conditions=conditions)[:, 0]
        print(f"| {conditions if len(str(conditions)) < 40 else 'layer2: all 32'} | "
              f"{float((ours - upstream).abs().max()):.3g} | {float(upstream.abs().max()):.3g} |", flush=True)


if __name__ == "__main__":
    main()

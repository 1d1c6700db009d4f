"""Train some variants of the trained-routing study and write their rows, so a study can be split over GPUs.

    python3 scripts/train_variants.py --variants moba-32,moba-128-kconv3:2 --seeds 3 --device cuda --out DIR

(``variant:n`` trains that variant's first n replicates instead of ``--seeds``; ``variant:a-b`` its replicates a to b.)

Model seeds come from the study's seed sequence (``trained_routing._model_seeds``), so replicate r of a
variant is the same model whichever run trains it: CSVs of several runs concatenate into one study
(``pandas.concat``) that ``trained_routing.summary`` and ``plot`` read as if it had run at once.
"""

from __future__ import annotations

import argparse
import os
import time

from mobalab.experiments import trained_routing as exp


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", required=True, help="comma list (variant or variant:seeds), trained in turn")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the study's tiny CPU configuration (a check of the script)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    for item in a.variants.split(","):
        v, _, n = item.partition(":")
        start = time.time()
        make = exp.Config.quick if a.quick else exp.Config
        first, _, last = n.partition("-")
        if last:
            reps = dict(n_seeds=int(last) + 1, first_replicate=int(first))
        else:
            reps = dict(n_seeds=int(n) if n else a.seeds)
        # a dense model's statistics are taken at the study's routes (those of its MoBA variants)
        routes = tuple(exp._routes(make())) if exp.model_config(make(), v).attention == "dense" else None
        df = exp.run(make(variants=(v,), device=a.device, routes=routes, **reps))
        tag = f"-r{first}-{last}" if last else ""
        df.to_csv(os.path.join(a.out, f"trained-{v}{tag}.csv"), index=False)  # each variant as soon as it is done
        models = df.drop_duplicates(["variant", "replicate"])
        print(f"{v}: {len(models)} models in {time.time() - start:.0f} s, accuracy "
              f"{', '.join(f'{x:.3f}' for x in models['accuracy'])}", flush=True)


if __name__ == "__main__":
    main()

"""MIAGM of Zhang, Yu, Wen, Backes & Zhang, "Generated Distributions Are All You Need for Membership Inference
Attacks Against Generative Models" (WACV 2024, arXiv 2310.19410); specs/attacks.md §8.2.

The release's generations stand in for its member distribution: a binary classifier is trained on M generated
images ("member") against M' auxiliary non-member images of the same domain ("non-member"), and a query image is
scored by its member probability. No shadow model, and no generation per query (one encoder pass).

Here the auxiliary images are a seeded `aux_fraction` of the calibration half's non-members (the attacker's public
same-domain data); the generations use those images' captions as prompts (a text-to-image API needs prompts; public
captions of the domain), `per_prompt` seeded generations each. The official code fine-tunes an ImageNet ResNet-18;
offline, the classifier works on the release's offline encoder features (GenerationAPI.embed): by default an RBF
support-vector machine with balanced classes (flexible enough to recognise the particular images a release keeps
regenerating, as the fine-tuned ResNet does; a linear model only sees distribution shifts), or `classifier=logistic`.
Its settings are fixed in advance (the official script picks no epoch on the target, and neither does this).
The spec's M = M' >= 5k is out of reach on a CPU; `per_prompt` generations per auxiliary caption set M.
`calibrate` returns scores on the calibration members and the held-out calibration non-members, never on the
auxiliary images it was fitted on, for the runner's direction and threshold.

Cost: 0 UNet passes per query; M generations once per release (`amortized_passes` in params).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ConfigError, DataError
from .base import ATTACKS, AttackScores, EncodedSamples, member_labels
from .blackbox import BlackBoxAttack, generation_seeds

CLASSIFIERS = ("svm", "logistic")


@ATTACKS.register("miagm")
class MIAGM(BlackBoxAttack):
    name = "miagm"
    statistic, members_lower = "generated-vs-auxiliary classifier margin", False

    def __init__(self, aux_fraction: float = 0.5, per_prompt: int = 4, classifier: str = "svm", C: float = 10.0,
                 seed: int = 0):
        super().__init__(seed)
        if not 0.0 < float(aux_fraction) < 1.0:
            raise ConfigError(f"miagm: aux_fraction must be in (0, 1), got {aux_fraction}")
        if int(per_prompt) < 1 or float(C) <= 0:
            raise ConfigError(f"miagm: per_prompt must be >= 1 and C > 0, got {per_prompt}, {C}")
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"miagm: classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        self.aux_fraction, self.per_prompt, self.C = float(aux_fraction), int(per_prompt), float(C)
        self.classifier = classifier
        self.model = None
        self.fit_ids: list[str] = []
        self.generation_cost: dict[str, float] = {}

    def calibrate(self, target, members, nonmembers, batch_size=32, progress=True) -> AttackScores:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        from ...rng import numpy_rng

        api = self.api(target, nonmembers)
        n_aux = int(round(self.aux_fraction * len(nonmembers)))
        if n_aux < 2 or n_aux >= len(nonmembers):
            raise DataError(f"miagm: cannot take {self.aux_fraction:g} of {len(nonmembers)} calibration non-members as "
                            "auxiliary images and keep the rest for the threshold (needs >= 3)")
        perm = numpy_rng(self.seed, "miagm/aux").permutation(len(nonmembers))
        aux, held = np.sort(perm[:n_aux]), np.sort(perm[n_aux:])
        aux_samples = nonmembers.subset(aux)
        self.fit_ids = list(aux_samples.ids)

        def generated(api, batch):
            images = [api.images(batch.captions, generation_seeds(self.seed, j, len(batch), "miagm"))
                      for j in range(self.per_prompt)]
            return {"features": np.concatenate([api.features(x) for x in images])}

        out, cost = self.per_query(target, aux_samples, generated, batch_size, progress, "miagm/generate")
        gen = out["features"]
        real = api.features(aux_samples.pixels.float().cpu())
        head = (SVC(kernel="rbf", C=self.C, gamma="scale", class_weight="balanced") if self.classifier == "svm"
                else LogisticRegression(C=self.C, max_iter=2000, class_weight="balanced"))
        self.model = make_pipeline(StandardScaler(), head)
        self.model.fit(np.concatenate([gen, real]), np.concatenate([np.ones(len(gen)), np.zeros(len(real))]))
        self.generation_cost = {"generated_images": int(len(gen)),
                                "amortized_passes": float(cost["passes_per_query"] * len(aux_samples))}
        cal = EncodedSamples.concat([members, nonmembers.subset(held)])
        res = self.score(target, cal, batch_size, progress)
        res.labels = member_labels(len(members), len(held))
        return res

    def score(self, target, samples, batch_size=32, progress=True) -> AttackScores:
        if self.model is None:
            raise ConfigError("miagm: call calibrate() first (it trains the generated-vs-auxiliary classifier)")
        api = self.api(target, samples)
        value = self.model.decision_function(api.features(samples.pixels.float().cpu()))
        self.cost = {"images_per_query": 0.0, "variations_per_query": 0.0, "passes_per_query": 0.0}
        return AttackScores(value, value, 0.0, ids=list(samples.ids))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "aux_fraction": self.aux_fraction, "per_prompt": self.per_prompt,
                "classifier": {"svm": "RBF SVC", "logistic": "logistic regression"}[self.classifier]
                + " (balanced classes) on standardized offline encoder features", "C": self.C,
                "n_aux": len(self.fit_ids), **self.generation_cost}

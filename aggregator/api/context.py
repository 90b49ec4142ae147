"""What each router of the API is built from: the Aggregator handle, the settings, counters and token check.

build_app makes one Context per app and hands it to every router's factory. It must never be module-level
state (each app has its own: the tests build many in one process) nor carry anything of one request.
"""

from __future__ import annotations

import dataclasses

from aggregator import api_models as models
from aggregator import metrics, options, privacy
from aggregator.api import auth, problems
from aggregator.runtime import Aggregator


@dataclasses.dataclass(frozen=True)
class Context:
    agg: Aggregator
    settings: options.DaemonSettings
    counters: metrics.Counters
    access: auth.Access
    refusals: problems.Refusals  # as the OpenAPI document lists them
    pseudonyms: privacy.Pseudonymizer  # identifiers as the writers show them

    @classmethod
    def of(cls, agg: Aggregator, settings: options.DaemonSettings, counters: metrics.Counters) -> Context:
        access = auth.access(settings.api_tokens, counters)
        return cls(agg, settings, counters, access, problems.Refusals.of(bearer=access.required),
                   models.pseudonymizer(settings.aggregator.delivery))


__all__ = ["Context"]

"""Rulesets from the control plane (docs/RULESET.md): the contract, matching, enforcement at
admission, the ledger and its persistence, and the periodic pull."""

from inference.rules.compiled import CompiledRuleset, ruleset_compile
from inference.rules.contract import RulesetDocument, RulesetInvalid, ruleset_parse
from inference.rules.enforcement import Match, Reservation, RuleEnforcer, RuleRejection, RulesetNotNewer
from inference.rules.keeper import RulesetKeeper, StateDirError
from inference.rules.pull import RulesetPuller

__all__ = [
    "CompiledRuleset",
    "Match",
    "Reservation",
    "RuleEnforcer",
    "RuleRejection",
    "RulesetDocument",
    "RulesetInvalid",
    "RulesetKeeper",
    "RulesetNotNewer",
    "RulesetPuller",
    "StateDirError",
    "ruleset_compile",
    "ruleset_parse",
]

"""`RulePass`: a pass made of onnxscript rewrite rules, with the count of rewrites in the report."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter import RewriteRule, RewriteRuleClassBase, RewriteRuleSet

from winnow.errors import PassRegistrationError
from winnow.passes.base import Pass, PassResult
from winnow.passes.config import option

__all__ = ["RulePass"]


class RulePass(Pass):
    """A pass made of onnxscript rewrite rules: set `name`, `description` and `rules`.

    `rules` holds `RewriteRule`s (`MyRule.rule()` for a `RewriteRuleClassBase`), rule classes
    (built with `.rule()`), or `RewriteRuleSet`s. Each round applies every rule in order to the
    whole model; rounds repeat until no rule matches (at most `max_iterations`).
    `ctx.report[name]` gets the number of rewrites, in all and per rule (a rule is named by its
    `name`, else `rule<index>`).
    """

    rules: ClassVar[Sequence[Any]] = ()

    @dataclass(frozen=True)
    class Config:
        """Options of a rule pass."""

        max_iterations: int = option(10, "rounds of rule application at most", min=1)

    @classmethod
    def check_definition(cls) -> None:
        """Also require at least one rule, each a rewrite rule, rule class or rule set."""
        super().check_definition()
        try:
            named_rules(cls.rules)
        except TypeError as exc:
            raise PassRegistrationError(f"rule pass '{cls.name}': {exc}") from None

    def call(self, model: ir.Model) -> PassResult:
        """Apply the rules until none matches; report the rewrite counts."""
        from winnow.passes.manager import PassContext

        rules = named_rules(self.rules)
        by_rule = dict.fromkeys((label for label, _ in rules), 0)
        for _ in range(self.config.max_iterations):
            applied = 0
            for label, rule in rules:
                count = RewriteRuleSet([rule]).apply_to_model(model)
                by_rule[label] += count
                applied += count
            if not applied:
                break
        total = sum(by_rule.values())
        PassContext.current().report[self.name] = {"rewrites": total, "by_rule": by_rule}
        return PassResult(model, modified=total > 0)


def named_rules(rules: Sequence[Any]) -> list[tuple[str, RewriteRule]]:
    """The rules as (label, `RewriteRule`) pairs, label = the rule's name or `rule<index>` (the
    commuted variants of one rule share its name); TypeError when empty or not rules."""
    flat: list[RewriteRule] = []
    for item in rules:
        if isinstance(item, RewriteRuleSet):
            flat += list(item.rules)
        elif isinstance(item, type) and issubclass(item, RewriteRuleClassBase):
            flat.append(item.rule())
        elif isinstance(item, RewriteRule):
            flat.append(item)
        else:
            raise TypeError(f"{item!r} in `rules` is not an onnxscript RewriteRule, "
                            "RewriteRuleClassBase subclass or RewriteRuleSet")
    if not flat:
        raise TypeError("`rules` is empty; give at least one onnxscript RewriteRule")
    return [(rule.name or f"rule{index}", rule) for index, rule in enumerate(flat)]

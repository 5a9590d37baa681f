"""The budget form: thresholds and recipients typed as lists, everything checked by the model."""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from finops.budgets.models import MAX_THRESHOLD, Budget, thresholds_validate
from finops.budgets.services import FIXED_AFTER_CREATE

MAX_RECIPIENTS = 50
SEPARATORS = re.compile(r"[\s,;]+")


class BudgetForm(forms.ModelForm):
    thresholds = forms.CharField(
        initial="50, 80, 100", max_length=200,
        help_text=f"Percentages of the limit, separated by commas (1 to {MAX_THRESHOLD}); one email each per period.")
    recipients = forms.CharField(
        required=False, max_length=10_000, widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Email addresses, separated by commas or new lines.")

    class Meta:
        model = Budget
        fields = ["name", "tenant", "feature", "period", "unit", "limit", "thresholds", "recipients", "action",
                  "throttle_tokens_per_minute", "throttle_requests_per_minute", "downgrade_model", "cap_max_tokens",
                  "enforcement", "on_expiry"]
        widgets = {"enforcement": forms.RadioSelect, "on_expiry": forms.RadioSelect}
        help_texts = {
            "unit": "Tokens count what a model generated an answer for: a cache hit's tokens are saved, not "
                    "spent, and do not count (at list price a cache hit costs nothing either). A failed attempt "
                    "that is retried or falls back to another model counts what it spent.",
            "throttle_requests_per_minute": "Requests per minute, cache hits included: a request answered from "
                                            "the cache is still a request. Retries and fallbacks of one request "
                                            "count once.",
            "throttle_tokens_per_minute": "Tokens per minute (prompt + max_tokens, the unused part given back). "
                                          "A cache hit takes none.",
        }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["thresholds"] = ", ".join(str(t) for t in self.instance.thresholds)
            self.initial["recipients"] = "\n".join(self.instance.recipients)
            for name in FIXED_AFTER_CREATE:
                self.fields[name].disabled = True
                self.fields[name].help_text = "Fixed once the budget exists."

    def clean_thresholds(self) -> list[int]:
        raw = [part for part in SEPARATORS.split(self.cleaned_data["thresholds"]) if part]
        try:
            values = sorted({int(part.rstrip("%")) for part in raw})
        except ValueError:
            raise ValidationError("Thresholds are whole percentages, e.g. 50, 80, 100.", code="invalid") from None
        thresholds_validate(values)
        return values

    def clean_recipients(self) -> list[str]:
        addresses = list(dict.fromkeys(part for part in SEPARATORS.split(self.cleaned_data["recipients"]) if part))
        if len(addresses) > MAX_RECIPIENTS:
            raise ValidationError(f"At most {MAX_RECIPIENTS} recipients.", code="too_many")
        bad = []
        for address in addresses:
            try:
                validate_email(address)
            except ValidationError:
                bad.append(address)
        if bad:
            raise ValidationError("Not email addresses: %(bad)s", code="invalid", params={"bad": ", ".join(bad[:5])})
        return addresses

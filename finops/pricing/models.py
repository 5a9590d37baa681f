"""Versioned price books: what a model's tokens would cost from an API provider (list price) and
what its hardware costs (per GPU-hour and per kWh), each in force from its effective date."""

from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models

MONEY = {"max_digits": 18, "decimal_places": 6, "validators": [MinValueValidator(Decimal(0))]}
# A request's cost is a few micro-dollars: costs keep 12 decimal places so sums of millions stay exact.
COST = {"max_digits": 24, "decimal_places": 12}
ANY = "*"  # a price row for every model or device type the book does not name


class PriceBook(models.Model):
    name = models.CharField(max_length=200)
    effective_from = models.DateTimeField(unique=True, help_text="Events that started at or after this use this book.")
    created_at = models.DateTimeField(auto_now_add=True)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-effective_from"]

    def __str__(self) -> str:
        return f"{self.name} (from {self.effective_from:%Y-%m-%d %H:%M})"


class ModelPrice(models.Model):
    book = models.ForeignKey(PriceBook, on_delete=models.CASCADE, related_name="model_prices")
    model = models.CharField(max_length=200, help_text=f"The served model's name, or '{ANY}' for any other.")
    prompt_per_1m = models.DecimalField(**MONEY, help_text="USD per 1M prompt tokens")
    completion_per_1m = models.DecimalField(**MONEY, help_text="USD per 1M completion tokens")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["book", "model"], name="one_price_per_model_per_book")]

    def __str__(self) -> str:
        return f"{self.model}: ${self.prompt_per_1m}/${self.completion_per_1m} per 1M"


class DevicePrice(models.Model):
    book = models.ForeignKey(PriceBook, on_delete=models.CASCADE, related_name="device_prices")
    device_type = models.CharField(max_length=200, help_text=f"NVML's device name, 'cpu', or '{ANY}' for any other.")
    per_gpu_hour = models.DecimalField(**MONEY, help_text="USD per hour of the device")
    per_kwh = models.DecimalField(**MONEY, help_text="USD per kWh it draws")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["book", "device_type"], name="one_price_per_device_per_book")]

    def __str__(self) -> str:
        return f"{self.device_type}: ${self.per_gpu_hour}/h, ${self.per_kwh}/kWh"

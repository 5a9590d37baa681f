# Rollup columns that hold every sum of bounded records (issue 15; contracts.py, "Bounds"): costs
# get 26 digits before the point (PostgreSQL widens a numeric's precision without rewriting the
# table), and a device's memory sum becomes a double, as a day of readings can overflow a bigint.

from django.db import migrations, models

ROLLUP_COST = {"decimal_places": 12, "default": 0, "max_digits": 38}


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0009_device_per_runtime'),
    ]

    operations = [
        migrations.AlterField(
            model_name='devicerollup',
            name='mem_used_sum',
            field=models.FloatField(default=0.0),
        ),
        *(migrations.AlterField(model_name=model, name=name, field=models.DecimalField(**ROLLUP_COST))
          for model in ('rollup', 'marginalrollup') for name in ('list_cost', 'hardware_cost')),
        *(migrations.AlterField(model_name=model, name='saved_cost', field=models.DecimalField(
            db_default=0, help_text='List price cache hits saved', **ROLLUP_COST))
          for model in ('rollup', 'marginalrollup')),
    ]

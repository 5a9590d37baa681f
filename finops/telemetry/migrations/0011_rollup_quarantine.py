# What rollup runs left out instead of stopping (issue 15): one row per run and kind.

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0010_rollup_capacity'),
    ]

    operations = [
        migrations.CreateModel(
            name='RollupQuarantine',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('stat', models.CharField(help_text="The run's FillState: requests or samples", max_length=100)),
                ('source', models.CharField(help_text="The raw record's model, or the rollup row's", max_length=100)),
                ('count', models.BigIntegerField()),
                ('examples', models.JSONField(default=list, help_text='Ids of the first raw records, or keys of the first rows')),
                ('reason', models.TextField()),
                ('created_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
        ),
    ]

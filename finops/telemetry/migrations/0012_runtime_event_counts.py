# Per runtime, the events it recorded against the events stored (issue 15): counted by ingest.

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0011_rollup_quarantine'),
    ]

    operations = [
        migrations.CreateModel(
            name='RuntimeEventCount',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('runtime_id', models.CharField(max_length=100, unique=True)),
                ('recorded', models.BigIntegerField(default=0, help_text='The highest events_recorded a sample reported')),
                ('stored', models.BigIntegerField(default=0, help_text='Events with a seq stored, each once')),
                ('highest_stored', models.BigIntegerField(default=0, help_text='The highest seq stored')),
                ('updated_at', models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
        ),
    ]

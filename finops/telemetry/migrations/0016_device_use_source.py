from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0015_event_budget_refusals'),
    ]

    operations = [
        migrations.AddField(
            model_name='requestevent',
            name='device_use_source',
            field=models.CharField(blank=True, max_length=10, null=True),
        ),
    ]

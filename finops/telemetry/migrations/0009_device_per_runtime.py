# A device belongs to the runtime that reported it (issue 15): keyed by (runtime_id, uuid) instead of
# uuid alone. Existing rows are kept as they are: each already names its runtime, and a uuid was unique.

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('telemetry', '0008_record_sequence'),
    ]

    operations = [
        migrations.AlterField(
            model_name='device',
            name='uuid',
            field=models.CharField(max_length=100),
        ),
        migrations.AddConstraint(
            model_name='device',
            constraint=models.UniqueConstraint(fields=('runtime_id', 'uuid'), name='one_device_per_runtime'),
        ),
        migrations.AlterField(
            model_name='device',
            name='last_seen_at',
            field=models.DateTimeField(help_text='When the sample that named it last was taken (never after it arrived)'),
        ),
    ]

"""One settle watermark per hard budget instead of one per grant: a pass over a fleet's hard
budgets moved 20,000 grants' watermarks (a row write each) to the same instant. A budget's
watermark becomes the earliest of its latest period's grants' (they were equal; where they were
not, the earliest can only count an event twice, which makes a grant more careful, never looser)."""

from django.db import migrations, models

FORWARD = """
UPDATE budgets_budget SET grants_period_start = latest.period_start, grants_settled_through = latest.through
FROM (
    SELECT g.budget_id, g.period_start, MIN(g.reported_through) AS through
    FROM budgets_grant g
    WHERE g.period_start = (SELECT MAX(o.period_start) FROM budgets_grant o WHERE o.budget_id = g.budget_id)
    GROUP BY g.budget_id, g.period_start
) AS latest
WHERE budgets_budget.id = latest.budget_id
"""


def settle_watermarks(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(FORWARD)
        return
    Budget = apps.get_model("budgets", "Budget")
    Grant = apps.get_model("budgets", "Grant")
    for budget in Budget.objects.filter(grants__isnull=False).distinct():
        latest = Grant.objects.filter(budget=budget).order_by("-period_start").values_list("period_start", flat=True)[0]
        through = min(Grant.objects.filter(budget=budget, period_start=latest).values_list("reported_through", flat=True))
        Budget.objects.filter(pk=budget.pk).update(grants_period_start=latest, grants_settled_through=through)


class Migration(migrations.Migration):

    dependencies = [
        ("budgets", "0003_alert_claim_token"),
    ]

    operations = [
        migrations.AddField(
            model_name="budget",
            name="grants_period_start",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name="budget",
            name="grants_settled_through",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(settle_watermarks, migrations.RunPython.noop),
        migrations.RemoveField(
            model_name="grant",
            name="reported_through",
        ),
    ]

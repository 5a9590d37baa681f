import pytest

from finops.telemetry.models import RequestEvent


@pytest.mark.django_db
def test_the_raw_event_table_starts_empty() -> None:
    assert RequestEvent.objects.count() == 0

"""The error handler: a database failure is a 503 to the client, and its cause is in the log."""

from __future__ import annotations

import logging

from sqlalchemy import event


def test_a_database_failure_logs_the_drivers_reason_but_no_user_text(app, client, caplog) -> None:
    engine = app.extensions["chatapi"].db.engine
    # Every new connection refuses writes, as a read-only file or mount would.
    event.listen(engine, "connect", lambda connection, _record: connection.execute("PRAGMA query_only=ON"))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="chatapi.errors"):
        response = client.post("/api/v1/users", json={"username": "secretname", "password": "secret-password"})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    assert response.json["error"]["code"] == "service_unavailable"
    assert caplog.messages == ["database unavailable: OperationalError: attempt to write a readonly database"]
    assert "secret" not in caplog.text

"""Group commit for answers: the reports of answers that finish together are stored together.

A batch's answers resolve at the same moment, so their requests ask to store their reports
within one turn of the event loop. With `group` on, `ReportWriter.write` queues the report and
its audit event and the first one schedules a flush for the next turn: one transaction with one
multi-row INSERT per table, instead of one transaction per answer. The app turns it on for
PostgreSQL, where each commit is a network round trip and a WAL flush (A/B at 16 clients:
+12-38% requests/s); on SQLite a commit is a local WAL append, and grouping measured no better
within the noise, so each answer is written at once there (`bench/results/serve_load.md`). Each report is still stored with its
audit event or not at all. If the group fails on a foreign key (a study deleted while the model
answered), every report of the group is retried in a transaction of its own, so only the
requests whose study is gone get the error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tinyllava_med.server.db import crud

Row = dict[str, Any]


class ReportWriter:
    def __init__(self, db_engine: Engine, *, group: bool) -> None:
        self.db_engine = db_engine
        self.group = group
        self._waiting: list[tuple[Row, Row, asyncio.Future[None]]] = []

    async def write(self, report: Row, audit: Row) -> None:
        """Store `report` (a `crud.draft_report_row`) and `audit` (a `crud.audit_row`) in one
        transaction, shared with the other reports written in this turn of the loop. Raises
        what storing this report raised (IntegrityError for a deleted study)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((report, audit, done))
        if not self.group:
            self._flush()
        elif len(self._waiting) == 1:
            loop.call_soon(self._flush)
        await done

    def _store(self, group: list[tuple[Row, Row, asyncio.Future[None]]]) -> None:
        with self.db_engine.begin() as conn:
            crud.insert_draft_reports(conn, [r for r, _, _ in group])
            crud.insert_audit_rows(conn, [a for _, a, _ in group])

    def _flush(self) -> None:
        group, self._waiting = self._waiting, []
        try:
            self._store(group)
        except IntegrityError as e:
            if len(group) == 1:
                _settle(group[0][2], e)
                return
            for item in group:  # find out whose study is gone
                try:
                    self._store([item])
                except Exception as one:
                    _settle(item[2], one)
                else:
                    _settle(item[2], None)
            return
        except Exception as e:  # the database is down, say: every request of the group fails
            for _, _, done in group:
                _settle(done, e)
            return
        for _, _, done in group:
            _settle(done, None)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.cancelled():  # its request went away; what was stored stays stored
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)

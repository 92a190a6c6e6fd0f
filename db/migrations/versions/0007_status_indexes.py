"""indexes for the status, queue and planning queries of big rounds

`round status`, `jobs --round`, `queues` and the planner's "is this step finished?" check
filter jobs by round and step and by state and queue; with a million questions a round has
thousands of generation chunks. Checked with EXPLAIN (bench/orchestration.py --status-only).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 17:00:00.000000
"""
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_jobs_round_id_step_state', 'jobs', ['round_id', 'step', 'state'])
    op.create_index('ix_jobs_state_queue', 'jobs', ['state', 'queue'])


def downgrade() -> None:
    op.drop_index('ix_jobs_state_queue', table_name='jobs')
    op.drop_index('ix_jobs_round_id_step_state', table_name='jobs')

"""tracking_runs: the MLflow / TensorBoard run of each pipeline and round

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 16:00:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tracking_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=20), nullable=False),
    sa.Column('owner_id', sa.Integer(), nullable=False),
    sa.Column('target', sa.Text(), nullable=False),
    sa.Column('run_id', sa.String(length=500), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tracking_runs')),
    sa.UniqueConstraint('owner', 'owner_id', 'target', name=op.f('uq_tracking_runs_owner_owner_id_target'))
    )


def downgrade() -> None:
    op.drop_table('tracking_runs')

"""round names: an idempotency key for `round start --name`

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 15:40:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('name', sa.String(length=200), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_rounds_name'), ['name'])


def downgrade() -> None:
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('uq_rounds_name'), type_='unique')
        batch_op.drop_column('name')

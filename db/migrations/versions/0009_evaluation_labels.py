"""evaluation labels name their generation settings (room for them); a model's decoding overrides

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 17:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.alter_column('strategy', existing_type=sa.String(length=20), type_=sa.String(length=200),
                              existing_nullable=False)
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('decoding', sa.JSON(), nullable=False, server_default='{}'))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints', schema=None) as batch_op:
        batch_op.drop_column('decoding')
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.alter_column('strategy', existing_type=sa.String(length=200), type_=sa.String(length=20),
                              existing_nullable=False)

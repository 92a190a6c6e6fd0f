"""checkpoints.prompt_format: plain (the reference's prompts) or chat (the tokenizer's chat template)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 17:20:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('checkpoints') as batch:
        batch.add_column(sa.Column('prompt_format', sa.String(length=10), nullable=False, server_default='plain'))


def downgrade() -> None:
    with op.batch_alter_table('checkpoints') as batch:
        batch.drop_column('prompt_format')

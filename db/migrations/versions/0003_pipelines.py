"""pipelines

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 22:56:47.276069
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('pipelines',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipelines'))
    )
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('pipeline_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('pipeline_step', sa.String(length=40), nullable=True))
        batch_op.create_unique_constraint(batch_op.f('uq_rounds_pipeline_id_pipeline_step'), ['pipeline_id', 'pipeline_step'])
        batch_op.create_foreign_key(batch_op.f('fk_rounds_pipeline_id_pipelines'), 'pipelines', ['pipeline_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('rounds', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_rounds_pipeline_id_pipelines'), type_='foreignkey')
        batch_op.drop_constraint(batch_op.f('uq_rounds_pipeline_id_pipeline_step'), type_='unique')
        batch_op.drop_column('pipeline_step')
        batch_op.drop_column('pipeline_id')

    op.drop_table('pipelines')

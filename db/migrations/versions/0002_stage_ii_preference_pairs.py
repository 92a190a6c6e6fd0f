"""stage II preference pairs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 22:15:40.240989
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('preference_pairs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('question_id', sa.Integer(), nullable=False),
    sa.Column('pair_index', sa.Integer(), nullable=False),
    sa.Column('case', sa.String(length=20), nullable=False),
    sa.Column('confidence', sa.Float(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('chosen', sa.Text(), nullable=False),
    sa.Column('rejected', sa.Text(), nullable=False),
    sa.Column('chosen_generation_id', sa.Integer(), nullable=False),
    sa.Column('rejected_generation_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['chosen_generation_id'], ['generations.id'], name=op.f('fk_preference_pairs_chosen_generation_id_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['question_id'], ['questions.id'], name=op.f('fk_preference_pairs_question_id_questions'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['rejected_generation_id'], ['generations.id'], name=op.f('fk_preference_pairs_rejected_generation_id_generations'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_preference_pairs_round_id_rounds'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_preference_pairs')),
    sa.UniqueConstraint('round_id', 'question_id', 'pair_index', name=op.f('uq_preference_pairs_round_id_question_id_pair_index'))
    )
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_preference_pairs_round_id'), ['round_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_preference_pairs_round_id'))

    op.drop_table('preference_pairs')

"""a round's pool question ids move from `rounds.resolved` into a table of their own

`rounds.resolved` held every pool question id (`question_ids`, 8 MB of JSON at a million
questions), so every command that read the round's row (`round status`, `jobs --round`, the
planner) parsed them. They become rows of `round_questions(round_id, position, question_id)`,
and the JSON keeps their count (`question_count`). Existing rounds are moved over; the downgrade
puts the list back.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

BATCH = 10_000  # ids per executemany: a million-question round moves in bounded memory per statement

rounds = sa.table('rounds', sa.column('id', sa.Integer()), sa.column('resolved', sa.JSON()))
round_questions = sa.table('round_questions', sa.column('round_id', sa.Integer()), sa.column('position', sa.Integer()),
                           sa.column('question_id', sa.Integer()))


def upgrade() -> None:
    op.create_table('round_questions',
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('question_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], name=op.f('fk_round_questions_round_id_rounds'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['question_id'], ['questions.id'], name=op.f('fk_round_questions_question_id_questions'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('round_id', 'position', name=op.f('pk_round_questions'))
    )
    connection = op.get_bind()
    # One round at a time: only its JSON is in memory.
    for round_id in connection.scalars(sa.select(rounds.c.id).order_by(rounds.c.id)).all():
        resolved = connection.scalar(sa.select(rounds.c.resolved).where(rounds.c.id == round_id))
        if not isinstance(resolved, dict) or 'question_ids' not in resolved:
            continue  # weak-sft rounds have no pool
        ids = list(resolved.pop('question_ids') or [])
        for start in range(0, len(ids), BATCH):
            connection.execute(round_questions.insert(), [
                {'round_id': round_id, 'position': start + i, 'question_id': qid}
                for i, qid in enumerate(ids[start : start + BATCH])])
        resolved['question_count'] = len(ids)
        connection.execute(rounds.update().where(rounds.c.id == round_id).values(resolved=resolved))


def downgrade() -> None:
    connection = op.get_bind()
    for round_id in connection.scalars(sa.select(rounds.c.id).order_by(rounds.c.id)).all():
        resolved = connection.scalar(sa.select(rounds.c.resolved).where(rounds.c.id == round_id))
        if not isinstance(resolved, dict) or 'question_count' not in resolved:
            continue
        del resolved['question_count']
        resolved['question_ids'] = list(connection.scalars(
            sa.select(round_questions.c.question_id).where(round_questions.c.round_id == round_id)
            .order_by(round_questions.c.position)))
        connection.execute(rounds.update().where(rounds.c.id == round_id).values(resolved=resolved))
    op.drop_table('round_questions')

"""Agents' mail path, SMTP rate limits, IMAP alerting: what issues 6, 7 and 11 added.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 20:40:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # --- agents (issue 6) ---
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('agent_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_messages_agent_id_agents'), 'agents',
                                    ['agent_id'], ['id'])
    # --- rate limits (issue 11) ---
    op.create_table('rate_counts',
    sa.Column('key', sa.String(length=400), nullable=False),
    sa.Column('bucket', sa.BigInteger(), nullable=False),
    sa.Column('hits', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('key', 'bucket', name=op.f('pk_rate_counts'))
    )
    with op.batch_alter_table('rate_counts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rate_counts_bucket'), ['bucket'], unique=False)
    # --- imap (issue 7) ---
    with op.batch_alter_table('imap_mailboxes', schema=None) as batch_op:
        batch_op.add_column(sa.Column('history_below', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('action_uid', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('alerted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # --- imap (issue 7) ---
    with op.batch_alter_table('imap_mailboxes', schema=None) as batch_op:
        batch_op.drop_column('alerted_at')
        batch_op.drop_column('action_uid')
        batch_op.drop_column('history_below')
    # --- rate limits (issue 11) ---
    with op.batch_alter_table('rate_counts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rate_counts_bucket'))
    op.drop_table('rate_counts')
    # --- agents (issue 6) ---
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_messages_agent_id_agents'), type_='foreignkey')
        batch_op.drop_column('agent_id')

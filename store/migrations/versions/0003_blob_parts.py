"""Big values in pieces: blob_parts, and raws.parts / attachments.parts (issue 10).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 07:00:00

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('blob_parts',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('content', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', 'seq', name=op.f('pk_blob_parts'))
    )
    with op.batch_alter_table('blob_parts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blob_parts_created_at'), ['created_at'], unique=False)
    # Existing rows keep their bytes inline: parts = 0.
    with op.batch_alter_table('raws', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parts', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('attachments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parts', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_attachments_sha256'), ['sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('attachments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_attachments_sha256'))
        batch_op.drop_column('parts')
    with op.batch_alter_table('raws', schema=None) as batch_op:
        batch_op.drop_column('parts')
    with op.batch_alter_table('blob_parts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blob_parts_created_at'))
    op.drop_table('blob_parts')

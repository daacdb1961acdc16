"""Big values in pieces: blob_parts, blob_values, raws.parts / attachments.parts (issue 10).

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
    sa.PrimaryKeyConstraint('sha256', 'seq', name=op.f('pk_blob_parts'))
    )
    op.create_table('blob_values',
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('sha256', name=op.f('pk_blob_values'))
    )
    with op.batch_alter_table('blob_values', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blob_values_created_at'), ['created_at'],
                              unique=False)
    # Existing rows keep their bytes inline: parts = 0.
    with op.batch_alter_table('raws', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parts', sa.Integer(), server_default='0', nullable=False))
    with op.batch_alter_table('attachments', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parts', sa.Integer(), server_default='0', nullable=False))
        batch_op.create_index(batch_op.f('ix_attachments_sha256'), ['sha256'], unique=False)


def downgrade() -> None:
    parted = op.get_bind().execute(sa.text(
        "SELECT (SELECT count(*) FROM raws WHERE parts > 0)"
        " + (SELECT count(*) FROM attachments WHERE parts > 0)")).scalar()
    if parted:
        # 0002 has nowhere to keep them: going down would lose these mails' bytes.
        raise RuntimeError(f"{parted} raw mails or attachments are stored in pieces "
                           "(blob_parts); revision 0002 cannot hold them, not downgrading")
    # recreate="never": SQLite drops the column in place (a rebuilt table would trip the
    # foreign keys pointing at raws).
    with op.batch_alter_table('attachments', schema=None, recreate='never') as batch_op:
        batch_op.drop_index(batch_op.f('ix_attachments_sha256'))
        batch_op.drop_column('parts')
    with op.batch_alter_table('raws', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('parts')
    with op.batch_alter_table('blob_values', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blob_values_created_at'))
    op.drop_table('blob_values')
    op.drop_table('blob_parts')
